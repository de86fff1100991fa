"""Attention calls that read a ``ZipVLCache``.

Decode: ``SDPA(q, *cache_kv(...))`` -> ``decode_attention``.

During decoding, ``ZipVLCache.update`` returns ``zipvl::cache_kv(...)`` (position-ordered
dequantized K/V).  When those K/V reach an SDPA call unchanged, or through transformers'
``repeat_kv`` (``x[:, :, None].expand(B, Hkv, g, L, d).reshape(B, Hkv * g, L, d)``, which the
fused kernel's GQA indexing reproduces), the call is replaced by ``zipvl::decode_attention``
over the packed cache, and ``cache_kv`` becomes dead code.

Prefill: a sparse site whose K/V the cache marked (``zipvl::mark_prompt``) gets the cache's
token and layer, so that its kernel hands its selection over (``runtime/handoff.py``).
"""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..runtime import decode_attention  # noqa: F401  (registers the zipvl ops)
from ..runtime import handoff
from .sites import AttentionSite, shape, value

CACHE_KV = (torch.ops.zipvl.cache_kv, torch.ops.zipvl.cache_kv.default)
DECODE = torch.ops.zipvl.decode_attention.default


def _is_method(node, name) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def repeat_kv_source(node):
    """x when ``node`` is x, x.contiguous() or transformers' repeat_kv(x):
    ``x[:, :, None, :, :].expand(B, Hkv, g, L, d).reshape(B, Hkv * g, L, d)``."""
    while _is_method(node, "contiguous"):
        node = node.args[0]
    if _is_method(node, "reshape") or _is_method(node, "view"):
        exp = node.args[0]
        if _is_method(exp, "expand"):
            unsq = exp.args[0]
            full = slice(None, None, None)
            if (isinstance(unsq, fx.Node) and unsq.op == "call_function"
                    and unsq.target is operator.getitem
                    and unsq.args[1] == (full, full, None, full, full)):
                return unsq.args[0]
    return node


def _cache_output(node) -> tuple[fx.Node | None, int | None]:
    """(cache_kv node, output index) when ``node`` is a cache_kv output, directly or through
    repeat_kv; (None, None) otherwise."""
    node = repeat_kv_source(node)
    if (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target is operator.getitem and isinstance(node.args[1], int)):
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "call_function" and src.target in CACHE_KV:
            return src, node.args[1]
    return None, None


def cache_source(site: AttentionSite) -> fx.Node | None:
    """The cache_kv node whose outputs are this site's K and V, or None."""
    if site.pattern != "sdpa":
        return None
    ks, ki = _cache_output(site.k)
    vs, vi = _cache_output(site.v)
    if ks is not None and ks is vs and (ki, vi) == (0, 1):
        return ks
    return None


def prompt_marks(gm: fx.GraphModule) -> dict:
    """{(k node, v node): settings naming the ZipVLCache layer that stores them} from the
    ``zipvl::mark_prompt`` nodes (``runtime/handoff.py``)."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in handoff.MARK:
            k, v, token, layer = node.args[:4]
            out[(k, v)] = dict(cache_token=token, cache_layer=layer, cache_k=k, cache_v=v)
    return out


def prompt_cache(site: AttentionSite, marks: dict) -> dict:
    """The hand-over settings of a prefill site whose K/V a ZipVLCache stores ({} if none)."""
    key = (repeat_kv_source(site.k), repeat_kv_source(site.v))
    return marks.get(key, {})


def fusion_problem(site: AttentionSite) -> str:
    """'' when the decode call can be fused exactly, else the reason it cannot."""
    q = shape(site.q)
    if q is None or len(q) != 4 or q[2] != 1:
        return "query length is not 1 (a multi-token step over the cache)"
    if isinstance(site.dropout_p, fx.Node) or site.dropout_p != 0.0:
        return "dropout_p > 0"
    if site.is_causal:
        return "is_causal=True with one query (top-left causal mask sees one key)"
    if isinstance(site.scale, fx.Node):
        return "scale is a graph value, not a constant"
    k = shape(site.k)
    if k is None or not statically_known_true(q[1] % k[1] == 0):
        return "query heads are not a multiple of key heads"
    if site.attn_mask is not None:
        m = shape(site.attn_mask)
        mv = value(site.attn_mask)
        if m is None or len(m) != 4:
            return "attention mask is not a 4-d tensor"
        if not (mv.dtype.is_floating_point or mv.dtype == torch.bool):
            return f"attention mask dtype {mv.dtype} is not bool or float"
        if m[1] != 1 or m[2] != 1:
            return "per-head or per-query attention mask"
        if not statically_known_true(m[-1] == k[-2]):
            return "attention mask does not cover the cached length"
    return ""


def rewrite(gm: fx.GraphModule, site: AttentionSite, cache_kv: fx.Node,
            uid: int = -1) -> fx.Node:
    """Replace the SDPA call by ``zipvl::decode_attention`` on the cache's packed segments
    (``uid``: the call's stats id, where the op reports a slower kernel)."""
    names = [a.name for a in torch.ops.zipvl.cache_kv.default._schema.arguments]
    bound = dict(zip(names, cache_kv.args))
    bound.update(cache_kv.kwargs)
    d = shape(site.q)[-1]
    scale = float(site.scale) if site.scale is not None else float(d) ** -0.5
    with gm.graph.inserting_before(site.output):
        new = gm.graph.call_function(
            DECODE, args=(site.q, site.attn_mask, scale, *(bound[n] for n in names), uid))
    new.meta.update(site.output.meta)
    site.output.replace_all_uses_with(new)
    gm.graph.erase_node(site.output)
    return new
