"""Step 7: attention among the important tokens, and the scatter back to sequence order.

Two kernels compute the same function (outputs of unimportant queries are zero in
``sparse_queries`` mode; keys are always restricted to the important set):

- ``zipvl::sparse_prefill_sdpa``: a custom op, opaque to the compiler.  It reads the budgets on
  the host (one sync per layer), gathers only the kept rows and runs SDPA (cuDNN first on CUDA)
  on the compacted prefix.  Fastest; not CUDA-graph capturable.
- ``sparse_prefill_flex``: traced into the graph; FlexAttention over the kept-first permutation
  with the budget as a device tensor inside the mask.  No host sync; graph capturable.

Shapes: ``q [B, H, n, d]``, ``k, v [B, Hkv, n, d(v)]``, ``kept_idx [B, n]`` int64 (see
``selection.Selection``), ``budget, n_valid [B]`` int64.  Output ``[B, H, n, dv]``.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from . import masks, stats


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, h, n, d], idx [B, m] -> x[b, :, idx[b]]: [B, h, m, d] (contiguous)."""
    if x.shape[0] == 1:
        return x.index_select(2, idx[0])
    return x.gather(2, idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def scatter_rows(rows: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """rows [B, h, m, d] placed at positions idx [B, m] of a zero [B, h, n, d] tensor.

    The result is stored [B, n, h, d]-contiguous (the layout the output projection reads)."""
    B, h, m, d = rows.shape
    out = rows.new_zeros(B, n, h, d).transpose(1, 2)
    if B == 1:
        return out.index_copy_(2, idx[0], rows)
    return out.scatter_(2, idx[:, None, :, None].expand(B, h, m, d), rows)


def _sdpa_backends(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _zero_rows_beyond(x: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Zero rows r >= budget[b] of x [B, h, m, d] (also clears NaN of fully masked rows)."""
    r = torch.arange(x.shape[2], device=x.device)
    return torch.where((r[None, :] < budget[:, None])[:, None, :, None], x, 0.0)


@torch.library.custom_op("zipvl::sparse_prefill_sdpa", mutates_args=())
def sparse_prefill_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        kept_idx: torch.Tensor, budget: torch.Tensor, n_valid: torch.Tensor,
                        attn_mask: Optional[torch.Tensor], mask_kind: Optional[torch.Tensor],
                        scale: float, sparse_queries: bool, site: int) -> torch.Tensor:
    B, H, n, _ = q.shape
    host = torch.cat([budget, n_valid] + ([mask_kind.view(1)] if mask_kind is not None else []))
    host = host.tolist()  # the one host sync of this kernel
    budgets, valid = host[:B], host[B:2 * B]
    kind = host[-1] if mask_kind is not None else masks.STANDARD
    mask4 = masks.as_4d(attn_mask, B, n) if attn_mask is not None else None
    if kind == masks.NONCAUSAL:
        stats.update(site, n, [], valid, path="dense",
                     reason="non-causal mask at run time (bidirectional spans or an encoder)")
        with _sdpa_backends(q.device):
            out = F.scaled_dot_product_attention(q, _repeat_kv(k, H), _repeat_kv(v, H),
                                                 attn_mask=mask4, scale=scale)
        return out.transpose(1, 2).contiguous().transpose(1, 2)
    stats.update(site, n, budgets, valid)
    m = max(budgets)
    idx = kept_idx[:, :m]
    k_c, v_c = gather_rows(k, idx), gather_rows(v, idx)
    gqa = k.shape[1] != H
    with _sdpa_backends(q.device):
        if sparse_queries:
            q_c = gather_rows(q, idx)
            if kind == masks.STANDARD:
                o_c = F.scaled_dot_product_attention(q_c, k_c, v_c, is_causal=True, scale=scale,
                                                     enable_gqa=gqa)
            else:
                rows = mask4[:, 0].gather(1, idx[:, :, None].expand(B, m, n))
                sub = rows.gather(2, idx[:, None, :].expand(B, m, m))[:, None]
                o_c = F.scaled_dot_product_attention(q_c, _repeat_kv(k_c, H), _repeat_kv(v_c, H),
                                                     attn_mask=sub, scale=scale)
            return scatter_rows(_zero_rows_beyond(o_c, budget), idx, n)
        slot_ok = torch.arange(m, device=q.device)[None, :] < budget[:, None]  # [B, m]
        if mask4 is None:
            pos = torch.arange(n, device=q.device)
            ok = (idx[:, None, :] <= pos[None, :, None]) & slot_ok[:, None, :]  # [B, n, m]
        else:
            cols = mask4[:, 0].gather(2, idx[:, None, :].expand(B, n, m))
            ok = masks.allowed(cols) & slot_ok[:, None, :]
        bias = masks.bias(cols) if mask4 is not None and mask4.dtype != torch.bool else None
        sub = ok if bias is None else bias.masked_fill(~ok, float("-inf"))
        out = F.scaled_dot_product_attention(q, _repeat_kv(k_c, H), _repeat_kv(v_c, H),
                                             attn_mask=sub[:, None], scale=scale)
        out = torch.where(ok.any(-1)[:, None, :, None], out, 0.0)
        return out.transpose(1, 2).contiguous().transpose(1, 2)


@sparse_prefill_sdpa.register_fake
def _(q, k, v, kept_idx, budget, n_valid, attn_mask, mask_kind, scale, sparse_queries, site):
    B, H, n, _ = q.shape
    return q.new_empty(B, n, H, v.shape[-1]).transpose(1, 2)


@torch.library.custom_op("zipvl::observe_budget", mutates_args=())
def observe_budget(budget: torch.Tensor, n_valid: torch.Tensor, kept_idx: torch.Tensor,
                   site: int) -> torch.Tensor:
    """Hands the device budget to ``stats`` without a sync; returns a copy the kernel consumes
    (the data dependency keeps this op in the graph).  ``kept_idx`` only carries ``n``."""
    stats.update_lazy(site, kept_idx.shape[-1], budget, n_valid)
    return budget.clone()


@observe_budget.register_fake
def _(budget, n_valid, kept_idx, site):
    return torch.empty_like(budget)


def sparse_prefill_flex(q, k, v, kept_idx, budget, *, scale, sparse_queries):
    """Graph-capturable kernel (plain causal attention only; see module docstring)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, n, _ = q.shape
    k_c, v_c = gather_rows(k, kept_idx), gather_rows(v, kept_idx)
    if sparse_queries:
        q_c = gather_rows(q, kept_idx)

        def mask_mod(b, h, qi, ki):
            return (qi < budget[b]) & (ki <= qi)
    else:
        q_c = q.contiguous()

        def mask_mod(b, h, qi, ki):
            return (ki < budget[b]) & (kept_idx[b, ki] <= qi)
    block_mask = create_block_mask(mask_mod, B, None, n, n, device=q.device)
    out = flex_attention(q_c, k_c, v_c, block_mask=block_mask, scale=scale,
                         enable_gqa=k.shape[1] != H)
    if sparse_queries:  # rows >= budget are exact zeros; undo the permutation
        return scatter_rows(out, kept_idx, n)
    return out
