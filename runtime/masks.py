"""Attention masks as ZipVL sees them.

A mask is ``None`` (plain causal attention, every token valid) or a tensor broadcastable to
``[B, 1, n, n]``: bool (True = may attend) or additive float (0 = attend, a very negative value
or -inf = blocked; other values are a bias that is applied as is).

- ``valid[b, j]`` (a real token, not padding) is the mask's diagonal: a token sees itself.
- ``mask_kind``: STANDARD = exactly causal & valid keys (on valid query rows) with no bias, so
  compacted causal attention is exact; CAUSAL = never looks ahead but is not STANDARD (sliding
  window, bias), handled with a gathered mask; NONCAUSAL = looks ahead somewhere (encoders,
  bidirectional image spans), which ZipVL does not sparsify.
"""
from __future__ import annotations

import torch

STANDARD, CAUSAL, NONCAUSAL = 0, 1, 2


def as_4d(mask: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """Broadcast a mask to [B, 1, n, n] (a view, no copy)."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.expand(batch, 1, n, n)


def allowed(mask: torch.Tensor) -> torch.Tensor:
    """Bool view of a mask: True where attention is allowed."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def bias(mask: torch.Tensor) -> torch.Tensor | None:
    """Additive part of a float mask on allowed entries (None for bool masks)."""
    if mask.dtype == torch.bool:
        return None
    return torch.where(allowed(mask), mask, torch.zeros((), dtype=mask.dtype, device=mask.device))


def valid_tokens(mask4: torch.Tensor) -> torch.Tensor:
    """[B, 1, n, n] mask -> [B, n] bool: positions that attend to themselves."""
    return allowed(mask4).diagonal(dim1=-2, dim2=-1)[:, 0]


def mask_kind(mask4: torch.Tensor) -> torch.Tensor:
    """[B, 1, n, n] mask -> 0-dim int64 tensor: STANDARD, CAUSAL or NONCAUSAL (whole batch)."""
    ok = allowed(mask4)[:, 0]
    n = ok.shape[-1]
    pos = torch.arange(n, device=mask4.device)
    valid = ok.diagonal(dim1=-2, dim2=-1)
    row_valid = valid[:, :, None]
    causal = pos[None, :] <= pos[:, None]
    looks_ahead = (ok & ~causal & row_valid).any()
    expected = causal & valid[:, None, :]
    mismatch = ((ok != expected) & row_valid).any()
    b = bias(mask4)
    if b is not None:
        mismatch = mismatch | (b != 0).any()
    return torch.where(looks_ahead, NONCAUSAL, torch.where(mismatch, CAUSAL, STANDARD)).long()


def probe_rows(mask4: torch.Tensor, probes: torch.Tensor):
    """Rows of the mask at probe positions: (allowed [B, m, n] bool, bias [B, m, n] or None)."""
    B, _, _, n = mask4.shape
    rows = mask4[:, 0].gather(1, probes[:, :, None].expand(B, probes.shape[1], n))
    return allowed(rows), bias(rows)


def causal_probe_rows(probes: torch.Tensor, n: int) -> torch.Tensor:
    """Allowed [B, m, n] for plain causal attention: key j is visible from probe i iff j <= i."""
    return torch.arange(n, device=probes.device) <= probes[:, :, None]
