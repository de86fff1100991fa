"""Batched, device-side ZipVL token selection (DESIGN.md section 1, steps 1-6).

No host synchronisation: every budget stays a device tensor, so the whole selection traces into
one Inductor graph.  Shapes: ``q [B, H, n, d]``, ``k [B, Hkv, n, d]`` with ``H = g * Hkv``
(query head ``h`` reads KV head ``h // g``, the ``repeat_kv`` convention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import masks
from .probes import count_from_end, probe_positions


@dataclass
class Selection:
    """kept_idx [B, n] int64: kept positions ascending in ``[:, :budget[b]]``, the rest after.
    budget [B] int64: number of kept tokens.  n_valid [B] int64: non-padding tokens.
    mask_kind: 0-dim int64 ``masks`` kind of the attention mask (None without a mask)."""

    kept_idx: torch.Tensor
    budget: torch.Tensor
    n_valid: torch.Tensor
    mask_kind: torch.Tensor | None = None


def probe_scores(q, k, probes, probe_valid, allowed_rows, bias_rows, scale):
    """Accumulated probe attention ``a [B, n]`` (fp32) and probe counts ``c [B, n]`` per key."""
    B, H, n, d = q.shape
    Hkv, m = k.shape[1], probes.shape[1]
    qp = q.gather(2, probes[:, None, :, None].expand(B, H, m, d))
    qp = qp.reshape(B, Hkv, (H // Hkv) * m, d)
    logits = torch.matmul(qp, k.transpose(-1, -2)).float().view(B, H, m, n) * scale
    if bias_rows is not None:
        logits = logits + bias_rows[:, None].float()
    logits = logits.masked_fill(~allowed_rows[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.where(probe_valid[:, None, :, None], probs, 0.0)  # also clears empty (NaN) rows
    visible = allowed_rows & probe_valid[:, :, None]
    return probs.sum(dim=(1, 2)), visible.sum(dim=1)


def budget_from_scores(acc, n_valid, total, tau, ratio, keep_all):
    """Layer-adaptive budget (step 4) before clamping: smallest p with top-p mass >= tau * total."""
    if keep_all:
        return n_valid
    if ratio is not None:
        return torch.ceil(n_valid.double() * ratio).long()
    sorted_mass = acc.double().sort(dim=-1, descending=True).values
    reached = sorted_mass.cumsum(dim=-1) >= (tau * total.double())[:, None]
    return (~reached).sum(dim=-1) + 1


def clamp_budget(p, n_valid, min_keep, keep_recent):
    p = torch.maximum(p, torch.clamp(n_valid, max=max(min_keep, keep_recent)))
    return torch.minimum(p, n_valid)


def kept_order(score, budget):
    """Indices [B, n]: the top-``budget`` positions by ``score`` in ascending position order,
    then the others ascending.  Ties go to the lower position (stable sort)."""
    B, n = score.shape
    order = score.sort(dim=-1, descending=True, stable=True).indices
    pos = torch.arange(n, device=score.device).expand(B, n)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter(1, order, pos < budget[:, None])
    kept_before = keep.long().cumsum(dim=-1)
    dest = torch.where(keep, kept_before - 1, budget[:, None] + pos - kept_before)
    return torch.empty(B, n, dtype=torch.long, device=score.device).scatter(1, dest, pos)


def select(q, k, *, attn_mask, scale, tau, ratio, recent_probes, random_probes, keep_recent,
           min_keep, seed, salt, keep_all, mask_summary=None, stop_after=None):
    """Steps 1-6 for a batch -> ``Selection``.  ``attn_mask`` is None (plain causal) or a
    [B, 1, n, n] mask; ``mask_summary`` its ``masks.mask_summary`` if already computed (with
    ``attn_mask=None``: the valid tokens of a causal mask with key padding, STANDARD).

    ``stop_after`` (measurement, ``ZipVLConfig.stop_after``): return the last tensor of that
    stage instead: the probe mass ``[B, n]`` ("scores"), the clamped budget ``[B]`` ("budget")
    or the kept order ``[B, n]`` ("selection")."""
    B, H, n, _ = q.shape
    if attn_mask is None and mask_summary is None:
        valid, kind = torch.ones(B, n, dtype=torch.bool, device=q.device), None
    else:
        valid, kind = mask_summary if mask_summary is not None else masks.mask_summary(attn_mask)
    n_valid = valid.sum(dim=-1)
    probes, probe_valid = probe_positions(valid, recent_probes, random_probes, seed, salt)
    if attn_mask is None:  # plain causal, or causal & valid keys (mask never built)
        allowed_rows = masks.causal_probe_rows(probes, n, None if kind is None else valid)
        bias_rows = None
    else:
        rows = masks.mask_rows(attn_mask, probes)
        allowed_rows, bias_rows = masks.allowed(rows), masks.bias(rows)
    acc, seen_by = probe_scores(q, k, probes, probe_valid, allowed_rows, bias_rows, scale)
    if stop_after == "scores":
        return acc
    total = H * probe_valid.sum(dim=-1)
    budget = budget_from_scores(acc, n_valid, total, tau, ratio, keep_all)
    budget = clamp_budget(budget, n_valid, min_keep, keep_recent)
    if stop_after == "budget":
        return budget
    normalized = acc / (H * seen_by.clamp(min=1))
    recent = valid & (count_from_end(valid) <= keep_recent)
    score = torch.where(recent, float("inf"), torch.where(valid, normalized, float("-inf")))
    if stop_after == "selection":
        return kept_order(score, budget)
    return Selection(kept_order(score, budget), budget, n_valid, kind)
