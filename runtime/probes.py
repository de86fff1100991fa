"""Probe positions: the recent valid tokens plus a stratified pseudo-random sample of the rest.

``recent`` probes are the last ``recent`` valid tokens.  The ``random`` probes split the earlier
valid tokens into ``random`` equal strata and draw one token from each (without replacement, and
spread over the whole prompt).  The draw is a pure int64 hash of (stratum, valid length, seed,
salt), so eager PyTorch, Inductor's C++ and Triton code all draw the same probes, with no
generator state inside a compiled graph, and no sort or top-k over the sequence.

Shapes: ``valid [B, n] bool`` -> ``probes [B, m]`` int64 positions and ``probe_valid [B, m]``
bool, ``m = recent + random`` (static: no shape depends on ``n``).  Entries past the valid tokens
of a short sequence are flagged invalid; every valid token is a probe when ``n_valid <= m``.
"""
from __future__ import annotations

import torch

_MOD = 2147483648  # 2**31: every product below stays under 2**62


@torch.library.custom_op("zipvl::barrier", mutates_args=())
def barrier(x: torch.Tensor) -> torch.Tensor:
    """Identity (a copy) that the compiler cannot see through."""
    return x.clone()


@barrier.register_fake
def _(x):
    return torch.empty_like(x)


def hash_strata(stratum: torch.Tensor, n_valid: torch.Tensor, seed: int, salt: int):
    """Pseudo-random int64 in [0, 2**31) for stratum [m] and valid lengths [B] -> [B, m].

    Starts with an XOR of tensors so that Inductor cannot fold the arithmetic into a (32-bit)
    index expression on Triton."""
    mix = (n_valid * 104729 + (seed * 1000003 + salt * 15485863) % _MOD) % _MOD
    x = stratum[None, :] ^ mix[:, None]
    for shift in (13, 16, 11):
        x = (x * 1103515245 + 12345) % _MOD
        x = x ^ (x >> shift)
    return x


def count_from_end(valid: torch.Tensor) -> torch.Tensor:
    """[B, n] -> number of valid positions at or after each position."""
    return valid.flip(-1).long().cumsum(-1).flip(-1)


def probe_positions(valid: torch.Tensor, recent: int, random: int, seed: int, salt: int):
    """Choose probe query positions per sequence (see module docstring)."""
    n = valid.shape[-1]
    # rank[j] = number of valid tokens at or before j.  The barrier keeps Inductor from turning
    # it (cumsum of ones without padding) into index arithmetic, which fails on Triton.
    rank = torch.ops.zipvl.barrier(valid.long().cumsum(-1))
    n_valid = rank[:, -1]
    n_recent = n_valid.clamp(max=recent)
    eligible = n_valid - n_recent  # valid tokens before the recent window
    t = torch.arange(recent, device=valid.device)
    recent_rank = (n_valid - n_recent + 1)[:, None] + t[None, :]
    recent_ok = t[None, :] < n_recent[:, None]
    s = torch.arange(random, device=valid.device)
    lo = s[None, :] * eligible[:, None] // max(random, 1)
    hi = (s[None, :] + 1) * eligible[:, None] // max(random, 1)
    width = (hi - lo).clamp(min=1)
    random_rank = lo + hash_strata(s, n_valid, seed, salt) % width + 1
    random_ok = hi > lo
    target = torch.cat([recent_rank, random_rank], dim=-1)
    probe_valid = torch.cat([recent_ok, random_ok], dim=-1)
    # position of the target-th valid token = number of positions ranked below it (a small
    # [B, m, n] count; torch.searchsorted does not lower on every Inductor backend)
    positions = (rank[:, None, :] < target[:, :, None]).sum(-1).clamp(max=n - 1)
    return positions, probe_valid
