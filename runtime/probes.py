"""Probe positions: the recent valid tokens plus a deterministic pseudo-random sample of the rest.

The sampler is a pure function of (position, sequence length, seed, salt) built from int64
arithmetic, so eager PyTorch, Inductor's C++ and Triton code all draw the same probes, with no
generator state inside a compiled graph.  Shapes: ``valid [B, n] bool`` -> ``probes [B, m]``
int64 and ``probe_valid [B, m]`` bool, where ``m = min(recent + random, n)``.  Invalid (padding)
positions are chosen only when a sequence has fewer than ``m`` valid tokens, and are flagged.
"""
from __future__ import annotations

import torch

_MOD = 2147483648  # 2**31: every product below stays under 2**62
_RECENT_PRIORITY = 1 << 60
_SAMPLED_PRIORITY = 1 << 58
_POS_BITS = 24  # positions below 16M tokens keep priorities unique


def hash_positions(pos: torch.Tensor, n: int, seed: int, salt: int) -> torch.Tensor:
    """Pseudo-random int64 in [0, 2**31) per position; deterministic in all its arguments."""
    x = (pos * 7919 + n * 104729 + seed * 1000003 + salt * 15485863) % _MOD
    for shift in (13, 16):
        x = (x * 1103515245 + 12345) % _MOD
        x = x ^ (x >> shift)
    return x


def count_from_end(valid: torch.Tensor) -> torch.Tensor:
    """[B, n] -> number of valid positions at or after each position."""
    return valid.flip(-1).long().cumsum(-1).flip(-1)


def probe_positions(valid: torch.Tensor, recent: int, random: int, seed: int, salt: int):
    """Choose probe query positions per sequence (see module docstring)."""
    n = valid.shape[-1]
    pos = torch.arange(n, device=valid.device)
    from_end = count_from_end(valid)
    is_recent = valid & (from_end <= recent)
    sampled_key = (hash_positions(pos, n, seed, salt) << _POS_BITS) + pos
    priority = torch.where(
        is_recent, _RECENT_PRIORITY + pos,
        torch.where(valid, _SAMPLED_PRIORITY + sampled_key, pos))
    if random == 0:  # deterministic: never draw beyond the recent window
        priority = torch.where(valid & ~is_recent, pos, priority)
    m = min(recent + random, n)
    chosen = priority.topk(m, dim=-1).values
    probe_valid = chosen >= (_SAMPLED_PRIORITY if random else _RECENT_PRIORITY)
    probes = chosen & ((1 << _POS_BITS) - 1)
    return probes, probe_valid
