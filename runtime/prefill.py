"""The function a rewritten attention site calls: selection + sparse attention, traced by Inductor.

The rewrite passes ``q, k, v, attn_mask`` exactly as the model gave them to SDPA (or as the
unfused pattern computed them) and every setting as a plain keyword, so the traced graph, and
Inductor's cache key, depend on nothing but the node itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import masks, selection, stats
# importing sparse_attention registers the torch.ops.zipvl custom ops used below
from .sparse_attention import dense_after, sparse_prefill_flex  # noqa: F401


def mask_summary_for(attn_mask, q):
    """(valid [B, n], kind) of a model's mask for queries q [B, H, n, d] (``masks``)."""
    B, _, n, _ = q.shape
    return masks.mask_summary(masks.as_4d(attn_mask, B, n))


def key_padding_summary(pad, q):
    """(valid [B, n], STANDARD) of a mask known to be causal & ``pad[b, key]`` (``pad`` [B, m]
    bool, m >= n, of which the mask reads the first n columns; None: no padding) for queries
    q [B, H, n, d]: computed from the padding, O(n)."""
    B, _, n, _ = q.shape
    if pad is None:
        valid = torch.ones(B, n, dtype=torch.bool, device=q.device)
    else:
        torch._check(pad.shape[1] >= n, lambda: f"key padding of width {pad.shape[1]} < {n}")
        valid = pad[:, :n].bool()
    return valid, torch.full((), masks.STANDARD, dtype=torch.long, device=q.device)


def zipvl_prefill(q, k, v, attn_mask=None, *, scale, site, kernel, tau, ratio, recent_probes,
                  random_probes, keep_recent, min_keep, seed, salt, sparse_queries, keep_all,
                  min_tokens, stop_after=None, cache_token=None, cache_layer=-1, cache_k=None,
                  cache_v=None, mask_summary=None):
    """ZipVL sparse prefill of one causal self-attention call.

    q [B, H, n, d]; k, v [B, Hkv, n, d]; attn_mask None (plain causal) or broadcastable to
    [B, 1, n, n]; ``mask_summary`` its ``mask_summary_for`` when the graph computed it once for
    every layer, or with ``attn_mask=None`` the ``key_padding_summary`` of a causal mask with key
    padding that was never built.  Returns [B, H, n, dv].  ``cache_*``: the ZipVLCache layer
    storing this prompt's K/V [B, Hkv, n, d] (``runtime/handoff.py``), or None."""
    B, H, n, d = q.shape

    def dense_mask():
        """The mask a dense path needs: the model's, or causal & valid keys when the rewrite
        replaced a causal key-padding mask by its padding (built only here)."""
        if attn_mask is None and mask_summary is not None:
            return masks.causal_with_valid_keys(mask_summary[0])
        return attn_mask

    if n < min_tokens:  # decided while tracing (a shape guard: crossing it recompiles once)
        stats.update(site, n if isinstance(n, int) else None, [], [], path="dense",
                     reason=f"prompt shorter than min_tokens={min_tokens}")
        full = dense_mask()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=full, scale=scale,
                                              is_causal=full is None,
                                              enable_gqa=k.shape[1] != H)
    scale = d ** -0.5 if scale is None else scale
    mask4 = masks.as_4d(attn_mask, B, n) if attn_mask is not None else None
    if mask4 is not None and mask_summary is None:
        mask_summary = masks.mask_summary(mask4)
    sel = selection.select(
        q, k, attn_mask=mask4, scale=scale, tau=tau, ratio=ratio, recent_probes=recent_probes,
        random_probes=random_probes, keep_recent=keep_recent, min_keep=min_keep, seed=seed,
        salt=salt, keep_all=keep_all, mask_summary=mask_summary, stop_after=stop_after)
    if stop_after is not None:
        stats.update(site, n if isinstance(n, int) else None, [], [], path="dense",
                     reason=f"measurement: selection stops after {stop_after!r}")
        full = dense_mask()
        valid, kind = mask_summary if full is not None else (None, None)
        return torch.ops.zipvl.dense_after(q, k, v, full, kind, valid, sel, scale)
    if kernel == "flex":
        budget = sel.budget
        if cache_token is not None:   # its own op: kept out of CUDA graphs (handoff.py)
            budget = torch.ops.zipvl.deliver_selection(budget, sel.kept_idx, site, cache_token,
                                                       cache_layer, cache_k, cache_v)
        budget = torch.ops.zipvl.observe_budget(budget, sel.n_valid, sel.kept_idx, site)
        return sparse_prefill_flex(q, k, v, sel.kept_idx, budget, scale=scale)
    kind = sel.mask_kind
    return torch.ops.zipvl.sparse_prefill_sdpa(q, k, v, sel.kept_idx, sel.budget, sel.n_valid,
                                               attn_mask, kind, scale, sparse_queries, site,
                                               cache_token, cache_layer, cache_k, cache_v)
