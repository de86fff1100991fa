"""Step 7: attention among the important tokens, and the scatter back to sequence order.

Two kernels compute the same function (outputs of unimportant queries are zero in
``sparse_queries`` mode; keys are always restricted to the important set):

- ``zipvl::sparse_prefill_sdpa``: a custom op, opaque to the compiler.  It reads the budgets on
  the host (one sync per layer), gathers only the kept rows and runs SDPA (cuDNN first on CUDA)
  on the compacted prefix.  Fastest; not CUDA-graph capturable.
- ``sparse_prefill_flex``: traced into the graph; FlexAttention over the kept-first permutation
  with a block mask built from the device budget.  No host sync; graph capturable.  Only the
  ``sparse_queries`` mode of causal attention, mask-free or with key padding recognized in the
  graph (``passes/mask_source.py``: padding is never kept, so the kept tokens are plain causal).

Shapes: ``q [B, H, n, d]``, ``k, v [B, Hkv, n, d(v)]``, ``kept_idx [B, n]`` int64 (see
``selection.Selection``), ``budget, n_valid [B]`` int64.  Output ``[B, H, n, dv]``.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from . import handoff, masks, stats


def _seq_major(x: torch.Tensor) -> bool:
    """True when x [B, h, n, d] is stored [B, n, h, d] (how projections + RoPE leave Q/K/V)."""
    return x.transpose(1, 2).is_contiguous()


def _flat_rows(idx: torch.Tensor, n: int) -> torch.Tensor:
    """idx [B, m] positions -> [B * m] row numbers of a [B * n, ...] view."""
    return (idx + torch.arange(idx.shape[0], device=idx.device)[:, None] * n).reshape(-1)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, h, n, d], idx [B, m] -> x[b, :, idx[b]]: [B, h, m, d], stored like x."""
    B, h, n, d = x.shape
    m = idx.shape[1]
    if _seq_major(x):  # whole contiguous rows of h*d elements
        rows = x.transpose(1, 2).reshape(B * n, h * d).index_select(0, _flat_rows(idx, n))
        return rows.view(B, m, h, d).transpose(1, 2)
    if B == 1:
        return x.index_select(2, idx[0])
    return x.gather(2, idx[:, None, :, None].expand(-1, h, -1, d))


def scatter_rows(rows: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """rows [B, h, m, d] placed at positions idx [B, m] of a zero [B, h, n, d] tensor.

    The result is stored [B, n, h, d] (the layout the output projection reads)."""
    B, h, m, d = rows.shape
    out = rows.new_zeros(B * n, h * d)
    out.index_copy_(0, _flat_rows(idx, n), rows.transpose(1, 2).reshape(B * m, h * d))
    return out.view(B, n, h, d).transpose(1, 2)


def _causal_backends(device: torch.device):
    """cuDNN first for mask-free causal attention on CUDA (fastest on Hopper); masked calls keep
    PyTorch's own backend choice."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _dense_attention(q, k, v, mask4, scale):
    """Exact dense attention [B, H, n, dv], stored [B, n, H, dv]: mask-free causal (cuDNN first
    on CUDA) when ``mask4`` is None, else with the [B, 1, n, n] mask as given."""
    H = q.shape[1]
    with _causal_backends(q.device) if mask4 is None else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, _repeat_kv(k, H), _repeat_kv(v, H),
                                             attn_mask=mask4, is_causal=mask4 is None,
                                             scale=scale)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _within_budget(m: int, budget: torch.Tensor) -> torch.Tensor:
    """[B, m] bool: compacted slot r holds a kept token (r < budget[b]).  Slots past a shorter
    budget hold dropped tokens, appended so that one call serves the whole batch."""
    return torch.arange(m, device=budget.device)[None, :] < budget[:, None]


def _zero_rows_beyond(x: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Zero rows r >= budget[b] of x [B, h, m, d] (also clears NaN of fully masked rows)."""
    return torch.where(_within_budget(x.shape[2], budget)[:, None, :, None], x, 0.0)


def _kept_key_mask(mask4, query_pos, idx, budget):
    """Attention mask [B, 1, r, m] of the queries at positions ``query_pos`` [B, r] over the
    kept key slots ``idx`` [B, m]: the model's mask at those positions (bool, or additive float
    with -inf where blocked), or causal by position when ``mask4`` is None.  Key slots past
    each budget are always blocked."""
    slot_ok = _within_budget(idx.shape[1], budget)[:, None, :]
    if mask4 is None:
        return ((idx[:, None, :] <= query_pos[:, :, None]) & slot_ok)[:, None]
    rows = mask4[:, 0].gather(1, query_pos[:, :, None].expand(-1, -1, mask4.shape[-1]))
    sub = rows.gather(2, idx[:, None, :].expand(-1, query_pos.shape[1], -1))
    if sub.dtype == torch.bool:
        return (sub & slot_ok)[:, None]
    return masks.bias(sub).masked_fill(~(masks.allowed(sub) & slot_ok), float("-inf"))[:, None]


# The host read of the budget cannot be recorded into a CUDA graph.
@torch.library.custom_op("zipvl::sparse_prefill_sdpa", mutates_args=(),
                         tags=handoff.CUDAGRAPH_UNSAFE)
def sparse_prefill_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        kept_idx: torch.Tensor, budget: torch.Tensor, n_valid: torch.Tensor,
                        attn_mask: Optional[torch.Tensor], mask_kind: Optional[torch.Tensor],
                        scale: float, sparse_queries: bool, site: int,
                        cache_token: Optional[torch.Tensor] = None, cache_layer: int = -1,
                        cache_k: Optional[torch.Tensor] = None,
                        cache_v: Optional[torch.Tensor] = None) -> torch.Tensor:
    B, H, n, _ = q.shape
    cache = handoff.receiver(cache_token)
    plan = cache.plan(cache_layer, cache_k, kept_idx, budget) if cache is not None else None
    host = torch.cat([budget, n_valid]
                     + ([mask_kind.view(1)] if mask_kind is not None else [])
                     + ([plan.counts.reshape(-1)] if plan is not None else []))
    host = host.tolist()  # the one host sync of this kernel
    budgets, valid = host[:B], host[B:2 * B]
    kind = host[2 * B] if mask_kind is not None else masks.STANDARD
    if plan is not None and kind != masks.NONCAUSAL:
        counts = host[-2 * B:]
        cache.adopt(cache_layer, cache_k, cache_v, plan, [counts[:B], counts[B:]],
                    stats.site_name(site))
    mask4 = masks.as_4d(attn_mask, B, n) if attn_mask is not None else None
    if kind == masks.NONCAUSAL:
        stats.update(site, n, [], valid, path="dense",
                     reason="non-causal mask at run time (bidirectional spans or an encoder)")
        return _dense_attention(q, k, v, mask4, scale)
    stats.update(site, n, budgets, valid, reason="" if kind == masks.STANDARD else
                 "mask is causal but not plain (window or bias): gathered mask, no causal kernel")
    m = max(budgets)
    idx = kept_idx[:, :m]
    k_c, v_c = gather_rows(k, idx), gather_rows(v, idx)
    if sparse_queries:
        q_c = gather_rows(q, idx)
        if kind == masks.STANDARD:
            with _causal_backends(q.device):
                o_c = F.scaled_dot_product_attention(q_c, k_c, v_c, is_causal=True, scale=scale,
                                                     enable_gqa=k.shape[1] != H)
        else:
            o_c = F.scaled_dot_product_attention(q_c, _repeat_kv(k_c, H), _repeat_kv(v_c, H),
                                                 attn_mask=_kept_key_mask(mask4, idx, idx, budget),
                                                 scale=scale)
        if min(budgets) < m:
            o_c = _zero_rows_beyond(o_c, budget)
        return scatter_rows(o_c, idx, n)
    every_pos = torch.arange(n, device=q.device).expand(B, n)
    sub = _kept_key_mask(mask4, every_pos, idx, budget)  # [B, 1, n, m]
    out = F.scaled_dot_product_attention(q, _repeat_kv(k_c, H), _repeat_kv(v_c, H),
                                         attn_mask=sub, scale=scale)
    out = torch.where(masks.allowed(sub).any(-1)[:, :, :, None], out, 0.0)  # no key: zero row
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@sparse_prefill_sdpa.register_fake
def _(q, k, v, kept_idx, budget, n_valid, attn_mask, mask_kind, scale, sparse_queries, site,
      cache_token=None, cache_layer=-1, cache_k=None, cache_v=None):
    B, H, n, _ = q.shape
    return q.new_empty(B, n, H, v.shape[-1]).transpose(1, 2)


@torch.library.custom_op("zipvl::dense_after", mutates_args=())
def dense_after(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: Optional[torch.Tensor], mask_kind: Optional[torch.Tensor],
                valid: Optional[torch.Tensor], after: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact dense attention, run after ``after`` (a selection stage's output, unused: the data
    dependency keeps that stage in the graph; ``ZipVLConfig.stop_after``).  ``mask_kind`` and
    ``valid`` [B, n] are the mask's summary (None without a mask): plain causal masks without
    padding (STANDARD, every token valid) take the mask-free causal kernel, as the sparse path
    does."""
    B, H, n, _ = q.shape
    plain = attn_mask is None or (int(mask_kind) == masks.STANDARD and bool(valid.all()))
    return _dense_attention(q, k, v, None if plain else masks.as_4d(attn_mask, B, n), scale)


@dense_after.register_fake
def _(q, k, v, attn_mask, mask_kind, valid, after, scale):
    B, H, n, _ = q.shape
    return q.new_empty(B, n, H, v.shape[-1]).transpose(1, 2)


@torch.library.custom_op("zipvl::observe_budget", mutates_args=())
def observe_budget(budget: torch.Tensor, n_valid: torch.Tensor, kept_idx: torch.Tensor,
                   site: int) -> torch.Tensor:
    """Hands the device budget to ``stats`` without a sync (also inside a CUDA graph: stats
    keeps the tensor and reads it when asked).  Returns a copy the kernel consumes (the data
    dependency keeps this op in the graph)."""
    stats.update_lazy(site, kept_idx.shape[-1], budget, n_valid)
    return budget.clone()


@observe_budget.register_fake
def _(budget, n_valid, kept_idx, site):
    return torch.empty_like(budget)


# Kept out of CUDA graphs: it hands the cache device tensors and a host copy that must outlive
# the graph's run, and the cache allocates its pools at run time (a replay would skip all three).
@torch.library.custom_op("zipvl::deliver_selection", mutates_args=(),
                         tags=handoff.CUDAGRAPH_UNSAFE)
def deliver_selection(budget: torch.Tensor, kept_idx: torch.Tensor, site: int,
                      cache_token: torch.Tensor, cache_layer: int, cache_k: torch.Tensor,
                      cache_v: torch.Tensor) -> torch.Tensor:
    """Hands the graph-capturable kernel's selection to the KV cache named by ``cache_token``
    (``handoff``): the cache plans the split on the device and builds the pools a layer later,
    once the pool sizes have reached the host (``ZipVLCache.deliver``: no host sync here).
    Returns a copy of ``budget`` for the kernel to consume (the data dependency keeps this op
    in the graph)."""
    cache = handoff.receiver(cache_token)
    if cache is not None:
        plan = cache.plan(cache_layer, cache_k, kept_idx, budget)
        cache.deliver(cache_layer, cache_k, cache_v, plan, stats.site_name(site))
    return budget.clone()


@deliver_selection.register_fake
def _(budget, kept_idx, site, cache_token, cache_layer, cache_k, cache_v):
    return torch.empty_like(budget)


FLEX_BLOCK = 128   # rows and keys per block of the FlexAttention block mask


def prefix_causal_block_mask(budget: torch.Tensor, heads: int, n: int,
                             block: int = FLEX_BLOCK):
    """BlockMask over B * heads heads (head ``b * heads + h``: head h of sequence b) of causal
    attention over the first ``budget[b]`` rows of ``n`` (a multiple of ``block``).

    Built with tensor ops from the device budget (no tensor is captured by the mask_mod, which
    is plain causal): query blocks at or past the budget get no key blocks at all, blocks below
    the diagonal are full, the diagonal block is masked causally.  Only the block counts depend
    on the budget; the block indices are the same for every head and are broadcast views (no
    memory of B * heads * (n / block)^2).  Rows inside the last active block but past the
    budget are computed and must be discarded by the caller.  Forward only (no transposed
    indices for a backward pass)."""
    from torch.nn.attention.flex_attention import BlockMask

    B = budget.shape[0]
    nb = n // block
    qb = torch.arange(nb, device=budget.device)
    active = (qb[None, :] * block < budget[:, None]).repeat_interleave(heads, dim=0)  # [B*h, nb]
    shape = (1, B * heads, nb, nb)
    # row r: full blocks 0 .. r - 1, then its diagonal block r (only the first entry is read)
    full_idx = qb.to(torch.int32).expand(shape)
    diag_idx = qb.to(torch.int32)[:, None].expand(shape)

    def causal(b, h, qi, ki):
        return ki <= qi

    return BlockMask.from_kv_blocks(
        active.to(torch.int32)[None], diag_idx,
        torch.where(active, qb[None, :], 0).to(torch.int32)[None], full_idx,
        BLOCK_SIZE=block, mask_mod=causal, seq_lengths=(n, n), compute_q_blocks=False)


def sparse_prefill_flex(q, k, v, kept_idx, budget, *, scale):
    """Graph-capturable kernel: compacted causal attention with the budget on the device
    (``sparse_queries`` mode, causal attention among kept tokens; see module docstring).

    One FlexAttention call for the whole batch, any batch size (also a symbolic one): each
    sequence's kept rows are gathered into buffers of whole ``FLEX_BLOCK``-row blocks, and the
    batch is folded into the heads (query head h of sequence b is head ``b * H + h``, which
    with GQA reads KV head ``b * Hkv + h // (H / Hkv)``: the same sequence).  (A batched call
    read the wrong sequence on CUDA, and calls on batch slices, with a storage offset, on CPU
    and CUDA, in torch 2.11-2.13.)"""
    from torch.nn.attention.flex_attention import flex_attention

    B, H, n, _ = q.shape
    # whole 128-row blocks: FlexAttention's results over a length that is not a multiple of
    # its block size varied from call to call on CPU (torch 2.13; pytorch#159247).  The rows
    # gathered past n repeat kept_idx's first entry: they lie past every budget, so no kept
    # query sees them as keys (causal order) and their own rows are discarded.
    padded = -(-n // FLEX_BLOCK) * FLEX_BLOCK
    pad_idx = torch.cat([kept_idx, kept_idx[:, :1].expand(B, padded - n)], dim=1)

    def heads_of_batch(x):  # [B, h, n, d] -> [1, B * h, padded, d], contiguous
        return gather_rows(x, pad_idx).reshape(1, B * x.shape[1], padded, x.shape[3])

    out = flex_attention(heads_of_batch(q), heads_of_batch(k), heads_of_batch(v), scale=scale,
                         enable_gqa=k.shape[1] != H,
                         block_mask=prefix_causal_block_mask(budget, H, padded))
    out = out.view(B, H, padded, -1)[:, :, :n]
    return scatter_rows(_zero_rows_beyond(out, budget), kept_idx, n)
