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


def causal_with_valid_keys(valid: torch.Tensor) -> torch.Tensor:
    """[B, n] valid tokens -> the STANDARD bool mask [B, 1, n, n]: causal & valid keys (the
    ``causal_probe_rows`` of every position)."""
    B, n = valid.shape
    every = torch.arange(n, device=valid.device).expand(B, n)
    return causal_probe_rows(every, n, valid)[:, None]


def valid_tokens(mask4: torch.Tensor) -> torch.Tensor:
    """[B, 1, n, n] mask -> [B, n] bool: positions that attend to themselves."""
    return allowed(mask4).diagonal(dim1=-2, dim2=-1)[:, 0]


CHUNK_ELEMENTS = 1 << 27  # mask entries per step of mask_kind (128 MiB of bool)


def mask_kind(mask4: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, n, n] mask -> 0-dim int64 tensor: STANDARD, CAUSAL or NONCAUSAL (whole batch).

    ``valid``: its ``valid_tokens`` if known.  On CUDA one Triton pass over the mask
    (``triton_masks``); elsewhere ``CHUNK_ELEMENTS`` entries at a time: no temporary of the
    mask's size."""
    valid = valid_tokens(mask4) if valid is None else valid
    if mask4.is_cuda:
        from . import triton_masks

        ahead, mismatch = triton_masks.scan(mask4, valid).bool().unbind()
    else:
        ahead, mismatch = _scan_chunked(mask4, valid)
    return torch.where(ahead, NONCAUSAL, torch.where(mismatch, CAUSAL, STANDARD)).long()


def _scan_chunked(mask4: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(looks ahead on a valid row, differs from causal & valid keys on a valid row or carries
    a bias), as 0-dim bools, reading ``CHUNK_ELEMENTS`` entries at a time."""
    n = mask4.shape[-1]
    pos = torch.arange(n, device=mask4.device)
    ahead = torch.zeros((), dtype=torch.bool, device=mask4.device)
    mismatch = torch.zeros((), dtype=torch.bool, device=mask4.device)
    step = max(1, CHUNK_ELEMENTS // max(n * mask4.shape[0], 1))
    for r0 in range(0, n, step):
        rows = mask4[:, 0, r0:r0 + step]
        ok = allowed(rows)
        row_valid = valid[:, r0:r0 + step, None]
        causal = pos[None, :] <= pos[r0:r0 + step, None]
        ahead |= (ok & ~causal & row_valid).any()
        mismatch |= ((ok != (causal & valid[:, None, :])) & row_valid).any()
        b = bias(rows)
        if b is not None:
            mismatch |= (b != 0).any()
    return ahead, mismatch


# ---- opaque ops for compiled graphs ---------------------------------------------------------------
# Under torch.compile, transformers (with torch < 2.14) materializes the causal mask from index
# comparisons.  Inductor fused that producer into ZipVL's mask reductions and then failed to
# compile on Triton at 32K tokens (a sympy value-range error on index-derived booleans;
# Qwen2-7B shape, torch 2.11, H200).  These ops read the realized mask: nothing fuses into them.
# (A mask built as exactly causal & key padding never gets here: ``passes/mask_source.py``.)


@torch.library.custom_op("zipvl::realize_mask", mutates_args=())
def realize_mask(mask: torch.Tensor) -> torch.Tensor:
    """A copy of a model's attention mask that every rewritten site of the graph reads.

    Inductor otherwise materializes transformers' index-built mask once per consuming opaque
    op (57 times for Qwen2-7B: one summary, 28 probe-row reads, 28 sparse kernels; 11 ms each
    at 128K with static shapes, ~88 ms with dynamic ones).  Behind this op it is computed once,
    at the cost of one copy."""
    return mask.clone()


@realize_mask.register_fake
def _(mask):
    return torch.empty_like(mask)


@torch.library.custom_op("zipvl::mask_summary", mutates_args=())
def mask_summary(mask4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 1, n, n] mask -> (``valid_tokens`` [B, n] bool, ``mask_kind`` 0-dim int64)."""
    valid = valid_tokens(mask4).clone()  # clone: not a view of the input
    return valid, mask_kind(mask4, valid)


@mask_summary.register_fake
def _(mask4):
    B, _, n, _ = mask4.shape
    return (torch.empty(B, n, dtype=torch.bool, device=mask4.device),
            torch.empty((), dtype=torch.long, device=mask4.device))


@torch.library.custom_op("zipvl::mask_rows", mutates_args=())
def mask_rows(mask4: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """Rows of the mask at probe positions [B, m] -> [B, m, n] (the mask's dtype)."""
    B, _, _, n = mask4.shape
    return mask4[:, 0].gather(1, probes[:, :, None].expand(B, probes.shape[1], n)).contiguous()


@mask_rows.register_fake
def _(mask4, probes):
    B, _, _, n = mask4.shape
    return mask4.new_empty(B, probes.shape[1], n)


def causal_probe_rows(probes: torch.Tensor, n: int,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """Allowed [B, m, n] for causal attention: key j is visible from probe i iff j <= i (and
    j is a valid token, with ``valid`` [B, n])."""
    rows = torch.arange(n, device=probes.device) <= probes[:, :, None]
    return rows if valid is None else rows & valid[:, None, :]
