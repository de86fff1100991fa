"""Plain-PyTorch reference of ZipVL sparse prefill (DESIGN.md section 1, steps 1-7).

Written for reading, one sequence at a time with explicit loops; every fast path is tested
against it.  It shares only the probe sampler with the runtime (``probe_positions``), which
defines *which* probes are drawn; everything after that is computed independently here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ZipVLConfig
from .runtime.probes import probe_positions


@dataclass
class ReferenceSelection:
    """kept: ascending kept positions; budget == len(kept); n_valid: non-padding tokens."""

    kept: torch.Tensor
    budget: int
    n_valid: int


def _allowed_and_bias(attn_mask, b, n, device):
    if attn_mask is None:
        return torch.ones(n, n, dtype=torch.bool, device=device).tril(), None
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m[b if m.shape[0] > 1 else 0, 0]
    if m.dtype == torch.bool:
        return m, None
    ok = m > torch.finfo(m.dtype).min / 2
    return ok, torch.where(ok, m, torch.zeros_like(m)).float()


def _attend(q, k, v, ok, bias, scale):
    """Softmax attention of q [r, d] over k, v [c, d] with allowed [r, c]; empty rows give 0."""
    logits = (q.float() @ k.float().T) * scale
    if bias is not None:
        logits = logits + bias
    logits = logits.masked_fill(~ok, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs @ v.float()


def select_sequence(q, k, allowed, bias, config: ZipVLConfig, scale: float, salt: int):
    """Steps 1-6 for one sequence: q [H, n, d], k [Hkv, n, d], allowed [n, n]."""
    H, n, _ = q.shape
    group = H // k.shape[0]
    valid = allowed.diagonal()
    n_valid = int(valid.sum())
    probes, probe_valid = probe_positions(valid[None], config.recent_probes,
                                          config.random_probes, config.seed, salt)
    probes = [int(p) for p, ok in zip(probes[0], probe_valid[0]) if ok]
    # Step 2-3: probe attention and accumulated score per key.
    acc = torch.zeros(n, dtype=torch.float64)
    seen_by = torch.zeros(n, dtype=torch.float64)
    for i in probes:
        seen_by += allowed[i].double().cpu()
        for h in range(H):
            row_bias = None if bias is None else bias[i:i + 1]
            logits = (q[h, i:i + 1].float() @ k[h // group].float().T) * scale
            if row_bias is not None:
                logits = logits + row_bias
            probs = torch.softmax(logits.masked_fill(~allowed[i:i + 1], float("-inf")), dim=-1)
            acc += probs[0].double().cpu()
    total = H * len(probes)
    # Step 4: layer-adaptive budget.
    if config.keeps_everything:
        budget = n_valid
    elif config.ratio is not None:
        budget = math.ceil(n_valid * config.ratio)
    else:
        mass = sorted(acc.tolist(), reverse=True)
        budget, running = len(mass), 0.0
        for p, a in enumerate(mass, start=1):
            running += a
            if running >= config.tau * total:
                budget = p
                break
    budget = min(max(budget, min(max(config.min_keep, config.keep_recent), n_valid)), n_valid)
    # Steps 5-6: normalized score picks the tokens; the recent ones always stay.
    normalized = acc / (H * seen_by.clamp(min=1))
    valid_positions = [j for j in range(n) if valid[j]]
    recent = set(valid_positions[-config.keep_recent:])
    ranked = sorted(valid_positions, key=lambda j: (j not in recent, -normalized[j].item(), j))
    kept = torch.tensor(sorted(ranked[:budget]), dtype=torch.long)
    return ReferenceSelection(kept, budget, n_valid)


def zipvl_attention(q, k, v, config: ZipVLConfig | None = None, attn_mask=None, is_causal=True,
                    *, scale=None, salt=0):
    """Reference ZipVL attention.

    q [B, H, n, d]; k, v [B, Hkv, n, d]; attn_mask None (then ``is_causal`` must be True) or
    broadcastable to [B, 1, n, n] (bool, or additive float).  Returns ``(out, selections)``:
    out [B, H, n, dv] in q's dtype (computed in fp32), one ``ReferenceSelection`` per sequence.
    """
    config = config or ZipVLConfig()
    if attn_mask is None and not is_causal:
        raise ValueError("ZipVL sparsifies causal attention: pass is_causal=True or a mask")
    B, H, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    group = H // k.shape[1]
    out = torch.zeros(B, H, n, v.shape[-1], dtype=torch.float32, device=q.device)
    selections = []
    for b in range(B):
        allowed, bias = _allowed_and_bias(attn_mask, b, n, q.device)
        sel = select_sequence(q[b], k[b], allowed, bias, config, scale, salt)
        selections.append(sel)
        S = sel.kept.to(q.device)
        rows = S if config.sparse_queries else torch.arange(n, device=q.device)
        ok = allowed[rows][:, S]
        sub_bias = None if bias is None else bias[rows][:, S]
        for h in range(H):
            out[b, h, rows] = _attend(q[b, h, rows], k[b, h // group, S], v[b, h // group, S],
                                      ok, sub_bias, scale)
    return out.to(q.dtype), selections
