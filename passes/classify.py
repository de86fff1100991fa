"""Which attention sites ZipVL may make sparse, and why the others stay dense.

Only causal self-attention over a prompt (query length > 1, equal query and key lengths) is
sparsified.  Everything else keeps its dense path, and the reason is reported.  Masks whose
causality can only be known at run time are checked there (``runtime.masks.mask_kind``).
"""
from __future__ import annotations

from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .mask_source import causal_key_padding
from .sites import AttentionSite, shape, value


def dense_reason(site: AttentionSite, kernel: str, sparse_queries: bool = True) -> str:
    """'' when the site can be rewritten exactly, else the reason it stays dense."""
    if site.problem:
        return site.problem
    q, k, v = shape(site.q), shape(site.k), shape(site.v) if site.v is not None else None
    if q is None or k is None or v is None or len(q) != 4 or len(k) != 4 or len(v) != 4:
        return "inputs are not 4-d [B, H, n, d] tensors"
    if site.phase == "decode":
        return "decode step (query length 1)"
    if not statically_known_true(q[-2] == k[-2]):
        return "query and key lengths differ (cross-attention or prefill after cached tokens)"
    if isinstance(site.dropout_p, fx.Node) or site.dropout_p != 0.0:
        return "dropout_p > 0"
    if kernel == "flex" and not sparse_queries:
        return ("sparse_queries=False needs kernel='sdpa' (the graph-capturable kernel computes "
                "kept queries only)")
    if kernel == "flex" and value(site.q).is_cuda and not statically_known_true(q[-1] >= 16):
        return "head dim < 16 is not supported by FlexAttention on CUDA (graph-capturable kernel)"
    if site.attn_mask is None and not site.is_causal:
        return "non-causal attention without a mask (encoder)"
    if isinstance(site.scale, fx.Node):
        return "scale is a graph value, not a constant"
    if q[1] != k[1] and not (site.enable_gqa and statically_known_true(q[1] % k[1] == 0)):
        return "query and key head counts differ without enable_gqa"
    if site.attn_mask is not None:
        m = shape(site.attn_mask)
        mv = value(site.attn_mask)
        if m is None:
            return "attention mask is not a tensor"
        if not (mv.dtype.is_floating_point or str(mv.dtype) == "torch.bool"):
            return f"attention mask dtype {mv.dtype} is not bool or float"
        if len(m) > 4 or (len(m) == 4 and m[1] != 1):
            return "per-head attention mask"
        if len(m) < 2 or not (statically_known_true(m[-1] == k[-2])
                              and statically_known_true(m[-2] == q[-2])):
            return "attention mask does not cover [n, n]"
        if kernel == "flex" and causal_key_padding(site.attn_mask, q[0], q[-2]) is None:
            return ("masked attention needs kernel='sdpa'; the graph-capturable kernel handles "
                    "causal attention, with key padding only as transformers builds it")
    return ""
