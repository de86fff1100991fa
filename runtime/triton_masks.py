"""Triton kernel of ``masks.mask_kind``: one read of the ``[B, 1, n, n]`` mask.

The PyTorch form scans the mask in chunks with a dozen elementwise passes per chunk (0.4 s at
128K tokens on an H100, session 3's profile); this kernel reads every entry once and raises two
flags (looks ahead; differs from causal & valid keys) with an atomic max, only where a tile
finds one.  Grid: one program per (sequence, block of ``ROWS`` rows); a program streams its rows
in tiles of ``COLS`` columns.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 8
COLS = 1024


@triton.jit
def _scan(M, VALID, FLAGS, n, s_mb, s_mr, s_mc, s_vb, low,
          IS_BOOL: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    b = tl.program_id(0)
    r = tl.program_id(1) * R + tl.arange(0, R)
    r_in = r < n
    row_valid = tl.load(VALID + b * s_vb + r, mask=r_in, other=0) != 0
    rows = M + b.to(tl.int64) * s_mb + r.to(tl.int64)[:, None] * s_mr  # n * n passes 2**31
    ahead = tl.zeros([R, C], tl.int32)
    mismatch = tl.zeros([R, C], tl.int32)
    for c0 in tl.range(0, n, C):
        c = c0 + tl.arange(0, C)
        c_in = c < n
        key_valid = tl.load(VALID + b * s_vb + c, mask=c_in, other=0) != 0
        inside = r_in[:, None] & c_in[None, :]
        m = tl.load(rows + c.to(tl.int64)[None, :] * s_mc, mask=inside, other=0)
        if IS_BOOL:
            ok = m != 0
        else:
            ok = m.to(tl.float32) > low
            mismatch |= (inside & ok & (m != 0)).to(tl.int32)  # a bias anywhere
        causal = c[None, :] <= r[:, None]
        live = row_valid[:, None] & c_in[None, :]
        ahead |= (ok & ~causal & live).to(tl.int32)
        mismatch |= ((ok != (causal & key_valid[None, :])) & live).to(tl.int32)
    any_ahead = tl.max(tl.max(ahead, axis=1), axis=0)
    any_mismatch = tl.max(tl.max(mismatch, axis=1), axis=0)
    tl.atomic_max(FLAGS, any_ahead, mask=any_ahead > 0)
    tl.atomic_max(FLAGS + 1, any_mismatch, mask=any_mismatch > 0)


def scan(mask4: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, n, n] mask (bool or float, any strides) and its ``valid`` [B, n] bool -> int32 [2]:
    (some valid row allows a key after itself, the mask differs from causal & valid keys on a
    valid row or carries a bias)."""
    B, _, n, _ = mask4.shape
    is_bool = mask4.dtype == torch.bool
    m = mask4.view(torch.uint8) if is_bool else mask4
    v = valid.to(torch.uint8)
    flags = torch.zeros(2, dtype=torch.int32, device=mask4.device)
    low = 0.0 if is_bool else float(torch.finfo(mask4.dtype).min) / 2
    _scan[(B, -(-n // ROWS))](
        m, v, flags, n, m.stride(0), m.stride(2), m.stride(3), v.stride(0), low,
        IS_BOOL=is_bool, R=ROWS, C=COLS)
    return flags
