"""Recognize a causal mask with key padding from the graph that builds it.

Under ``torch.compile`` transformers (``masking_utils.sdpa_mask``, index-based expansion) builds
the prefill mask of a causal LM from index vectors instead of passing ``is_causal``:

    q_idx = (arange(n) + 0)[None, None, :, None];  kv_idx = (arange(n) + 0)[None, None, None, :]
    mask  = (new_ones((), bool) & (kv_idx <= q_idx) & pad[arange(B)[:, None, None, None], kv_idx])
            .expand(B, -1, n, n)

with ``pad`` the ``[B, m]`` bool padding mask (absent without one; ``m >= n``, only its first
``n`` columns are read).  Materializing that
``[B, 1, n, n]`` tensor costs 16 GiB at 128K tokens.  When a mask node is exactly this
expression, ``causal_key_padding`` returns ``pad``'s node: the mask is ``causal & pad[b, key]``,
so the rewritten sites can run mask-free causal attention over the valid tokens and the mask
is never built.  Anything else (offsets, windows, other terms, other index vectors) is not
matched and the mask is realized and checked at run time as before.
"""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .sites import value

CAUSAL_ONLY = "causal"  # returned when the mask is plain causal (no padding term)

_Q_AXIS = (None, None, slice(None, None, None), None)
_KV_AXIS = (None, None, None, slice(None, None, None))
_BATCH_AXIS = (slice(None, None, None), None, None, None)


def _strip(node):
    """Skip value-preserving moves: ``x.to(device)`` / ``x.to(result.device)``."""
    while (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to"
           and len(node.args) <= 2 and not node.kwargs
           and (len(node.args) == 1 or not isinstance(node.args[1], torch.dtype))):
        node = node.args[0]
    return node


def _is_position_arange(node, n) -> bool:
    """``arange(n)`` or ``arange(n) + 0`` (positions 0 .. n-1), with length n."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.add:
        if len(node.args) != 2 or node.args[1] != 0 or isinstance(node.args[1], bool):
            return False
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target is torch.arange and len(node.args) == 1
            and set(node.kwargs) <= {"device", "dtype"}):
        return False
    v = value(node)
    return (isinstance(v, torch.Tensor) and v.dim() == 1 and not v.dtype.is_floating_point
            and statically_known_true(v.shape[0] == n))


def _axis_index(node, axis, n) -> bool:
    """``positions[axis]`` with positions an ``arange(n)``."""
    node = _strip(node)
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target is operator.getitem and node.args[1] == axis
            and _is_position_arange(node.args[0], n))


def _and_terms(node) -> list:
    """Leaves of an ``&`` tree (moves stripped)."""
    node = _strip(node)
    if isinstance(node, fx.Node) and node.op == "call_function" and \
            node.target in (operator.and_, torch.logical_and, torch.bitwise_and):
        return _and_terms(node.args[0]) + _and_terms(node.args[1])
    return [node]


def _is_true_scalar(node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "new_ones"
            and tuple(node.args[1:]) in ((), ((),)) and node.kwargs.get("dtype") is torch.bool)


def causal_key_padding(mask: fx.Node, batch, n):
    """The ``[B, n]`` padding node when ``mask`` is exactly ``causal & pad[b, key]`` over
    ``n`` tokens and ``batch`` sequences, ``CAUSAL_ONLY`` for plain causal, else None."""
    node = _strip(mask)
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "expand":
        node = node.args[0]
    causal, pads = 0, []
    for term in _and_terms(node):
        if _is_true_scalar(term):
            continue
        if (isinstance(term, fx.Node) and term.op == "call_function" and term.target is operator.le
                and _axis_index(term.args[0], _KV_AXIS, n)
                and _axis_index(term.args[1], _Q_AXIS, n)):
            causal += 1
            continue
        if (isinstance(term, fx.Node) and term.op == "call_function"
                and term.target is operator.getitem and isinstance(term.args[1], tuple)
                and len(term.args[1]) == 2 and _axis_index(term.args[1][1], _KV_AXIS, n)
                and _axis_index(term.args[1][0], _BATCH_AXIS, batch)):
            pad = term.args[0]
            v = value(pad)
            # any width: the expression reads columns 0 .. n-1 only (the padding of a later
            # generate() has a symbolic width once decode steps made that dimension dynamic)
            if (isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.dim() == 2
                    and statically_known_true(v.shape[0] == batch)):
                pads.append(pad)
                continue
        return None
    if causal != 1 or len(pads) > 1:
        return None
    return pads[0] if pads else CAUSAL_ONLY
