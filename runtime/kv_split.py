"""Splitting one layer's prompt K/V into the high-bit pool, the low-bit pool and the residual
window (``kv_pool``), with and without the prefill's importance.

Of a prompt of ``n`` tokens, the last ``min(n, residual_length)`` stay unquantized; of the
``m`` others, the tokens the layer's prefill kept go to the high-bit pool and the rest to the
low-bit pool (evicted at ``low_bits=0``).  Without importance, all ``m`` go to the high-bit pool
and nothing depends on data: ``split_uniform`` traces into a graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kv_pool


@dataclass
class Split:
    """A layer's stored prompt.  ``hi_counts``/``lo_counts`` per sequence (host ints; empty
    when built in a graph), ``evicted``: some prompt tokens were dropped."""

    hi: kv_pool.Pool
    lo: kv_pool.Pool | None
    res_k: torch.Tensor
    res_v: torch.Tensor
    span: torch.Tensor  # [0, n]: the cached length as a shape (see ZipVLLayer.span)
    evicted: bool
    hi_counts: list[int]
    lo_counts: list[int]

    def tensors(self) -> list[torch.Tensor]:
        """Every device tensor this split holds."""
        out = [self.res_k, self.res_v, *self.hi.tensors()]
        out += list(self.lo.tensors()) if self.lo is not None else []
        return [t for t in out if t is not None]


@dataclass
class Plan:
    """Device half of an importance split: ``member [B, m]`` (True: high-bit), ``counts
    [2, B]`` int64 (high, low)."""

    member: torch.Tensor
    counts: torch.Tensor


def pooled_length(n: int, residual_length: int) -> int:
    return n - min(n, residual_length)


def plan(n: int, kept_idx: torch.Tensor, budget: torch.Tensor, residual_length: int) -> Plan:
    """kept_idx [B, n] (kept positions in ``[:, :budget]``) -> the high-bit membership."""
    B = kept_idx.shape[0]
    m = pooled_length(n, residual_length)
    slot = torch.arange(n, device=kept_idx.device)[None, :]
    kept = torch.zeros(B, n, dtype=torch.bool, device=kept_idx.device)
    kept.scatter_(1, kept_idx, slot < budget[:, None])
    member = kept[:, :m]
    count = member.sum(dim=-1)
    return Plan(member, torch.stack([count, m - count]))


def split_by_importance(keys, values, plan: Plan, counts: list[list[int]], *, high_bits,
                        low_bits, group_size, vgroup) -> Split:
    """keys, values [B, Hkv, n, d]; ``counts`` = ``plan.counts`` read on the host."""
    m = plan.member.shape[1]
    hi_counts, lo_counts = counts

    def pool(member, cnt, bits):
        gather, pos = kv_pool.slot_positions(member, cnt, group_size)
        return kv_pool.pool_at(keys, values, gather, pos, bits, group_size, vgroup)

    has_low = max(lo_counts, default=0) > 0
    lo = pool(~plan.member, lo_counts, low_bits) if has_low and low_bits else None
    split = _with_residual(keys, values, m, pool(plan.member, hi_counts, high_bits), lo,
                           has_low and low_bits == 0, hi_counts, lo_counts)
    _mark_growing_dims(split)
    return split


def _with_residual(keys, values, m, hi, lo, evicted, hi_counts, lo_counts) -> Split:
    """The split with these pools; prompt tokens ``m:`` form the residual window."""
    return Split(hi, lo, keys[:, :, m:].contiguous(), values[:, :, m:].contiguous(),
                 keys.new_empty(0, keys.shape[-2]), evicted, hi_counts, lo_counts)


def _mark_growing_dims(split: Split) -> None:
    """Built outside a graph: tell Dynamo which dimensions change during decoding (pool slots,
    groups and residual tokens), so that the decode graph is compiled for them once instead of
    once static and once again dynamic."""
    dims = [(split.res_k, 2), (split.res_v, 2), (split.span, 1)]
    for pool in (split.hi, split.lo):
        if pool is not None:
            dims += [(t, t.dim() - 2) for t in pool.tensors()[:6] if t is not None]
            dims.append((pool.pos, 1))
    for t, dim in dims:
        torch._dynamo.maybe_mark_dynamic(t, dim)


def split_uniform(keys, values, *, high_bits, residual_length, group_size, vgroup) -> Split:
    """Every pooled prompt token at ``high_bits`` (no importance).  Traceable: empty slots of
    the last group repeat the last pooled token."""
    B, _, n, _ = keys.shape
    m = pooled_length(n, residual_length)
    P = kv_pool.round_up(m, group_size)
    slot = torch.arange(P, device=keys.device)
    gather = slot.clamp(max=max(m - 1, 0))[None, :].expand(B, P)
    pos = torch.where(slot < m, slot, -1)[None, :].repeat(B, 1)
    hi = kv_pool.pool_at(keys, values, gather, pos, high_bits, group_size, vgroup)
    return _with_residual(keys, values, m, hi, None, False, [], [])
