"""Attention sites in a Dynamo FX graph: fused SDPA calls and the unfused softmax pattern.

An ``AttentionSite`` holds the graph nodes of one attention call in SDPA's vocabulary, whatever
form it had in the graph; ``classify`` decides whether ZipVL may replace it.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
                torch.ops.aten.scaled_dot_product_attention.default,
                torch.ops.aten.scaled_dot_product_attention}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")


@dataclass
class AttentionSite:
    """One attention call.  ``output`` is the node producing [B, H, n, dv] (the softmax, for an
    unfused pattern that cannot be replaced); ``pattern`` is "sdpa" or "unfused"."""

    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    attn_mask: fx.Node | None
    is_causal: bool
    dropout_p: object
    scale: object
    enable_gqa: bool
    pattern: str
    problem: str = ""  # set by the matcher when the pattern cannot be replaced exactly

    @property
    def name(self) -> str:
        return module_path(self.output)

    @property
    def module_type(self) -> str:
        """Class name of the module that made the call ("" when unknown)."""
        stack = self.output.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        typ = list(stack.values())[-1][1]
        return typ.__name__ if isinstance(typ, type) else str(typ).rsplit(".", 1)[-1].strip("'>")

    @property
    def phase(self) -> str:
        lq = shape(self.q)
        return "decode" if lq is not None and lq[-2] == 1 else "prefill"


def module_path(node: fx.Node) -> str:
    """Clean module path of the innermost module that produced ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    # the root is the compiled module: ``self``, or ``args[0]`` where the compiled forward is
    # a ``*args`` wrapper (transformers >= 5.24 wraps forwards with ``deprecate_kwarg``)
    path = re.sub(r"^L\['self'\]\.?|^L\['args'\]\[0\]\.?", "", path)
    path = re.sub(r"L\['(\w+)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\._modules\['(\w+)'\]", r".\1", path)
    return path or node.name


def value(node) -> object:
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def shape(node) -> tuple | None:
    v = value(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def find_sdpa(gm: fx.GraphModule) -> list[AttentionSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        a = dict(zip(_SDPA_ARGS, node.args))
        a.update(node.kwargs)
        sites.append(AttentionSite(
            output=node, q=a["query"], k=a["key"], v=a["value"], attn_mask=a.get("attn_mask"),
            is_causal=bool(a.get("is_causal", False)), dropout_p=a.get("dropout_p", 0.0),
            scale=a.get("scale"), enable_gqa=bool(a.get("enable_gqa", False)), pattern="sdpa"))
    return sites


# ---- unfused pattern: matmul(q, k^T) -> *scale -> (+mask) -> softmax -> (cast) -> (dropout) -> matmul(., v)

_MATMUL = {operator.matmul, torch.matmul}
_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax}
_CASTS = {"to", "float", "type", "type_as", "half", "bfloat16", "contiguous"}


def _is_call(node, targets=(), methods=()):
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in targets:
        return True
    return node.op == "call_method" and node.target in methods


def _strip_casts(node):
    while _is_call(node, methods=_CASTS):
        node = node.args[0]
    return node


def _last_dim_transpose_source(node):
    """k if node is k.transpose(-2, -1) (any spelling), else None."""
    if _is_call(node, targets={torch.transpose}, methods={"transpose"}):
        dims = [node.args[i] if len(node.args) > i else None for i in (1, 2)]
        rank = len(shape(node) or ())
        norm = {d % rank for d in dims if isinstance(d, int)} if rank else set()
        if norm == {rank - 2, rank - 1}:
            return node.args[0]
    return None


def _single_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def find_unfused(gm: fx.GraphModule) -> list[AttentionSite]:
    sites = []
    for sm in gm.graph.nodes:
        if not _is_call(sm, _SOFTMAX, {"softmax"}):
            continue
        dim = sm.kwargs.get("dim", sm.args[1] if len(sm.args) > 1 else None)
        rank = len(shape(sm) or ())
        if not isinstance(dim, int) or rank != 4 or dim % rank != rank - 1:
            continue
        x = _strip_casts(sm.args[0])
        mask = None
        if _is_call(x, {operator.add, torch.add}, {"add"}):
            lhs, rhs = x.args[0], x.args[1]
            if _is_call(_strip_casts(rhs), _MATMUL | {operator.mul, operator.truediv},
                        {"matmul", "mul", "div"}):
                lhs, rhs = rhs, lhs
            x, mask = _strip_casts(lhs), rhs
        scale, mm = 1.0, x
        if _is_call(x, {operator.mul, torch.mul}, {"mul"}):
            a, b = x.args[:2]
            mm, scale = (b, a) if isinstance(a, (int, float)) else (a, b)
        elif _is_call(x, {operator.truediv, torch.div}, {"div"}):
            mm, divisor = x.args[:2]
            scale = 1.0 / divisor if isinstance(divisor, (int, float)) else divisor
        if not _is_call(mm, _MATMUL, {"matmul"}):
            continue
        k = _last_dim_transpose_source(mm.args[1])
        if k is None:
            continue
        # forward: softmax -> casts/dropout -> matmul(weights, v)
        cur, problem, dropout = sm, "", 0.0
        while True:
            nxt = _single_user(cur)
            if nxt is None:
                problem = "attention weights are used elsewhere (e.g. output_attentions)"
                break
            if _is_call(nxt, {F.dropout, torch.dropout}, {"dropout"}):
                p = nxt.kwargs.get("p", nxt.args[1] if len(nxt.args) > 1 else 0.5)
                training = nxt.kwargs.get("training", nxt.args[2] if len(nxt.args) > 2 else True)
                dropout = p if training else 0.0
            elif not _is_call(nxt, methods=_CASTS):
                break
            cur = nxt
        if problem:
            out, v = sm, None
        elif _is_call(nxt, _MATMUL, {"matmul"}) and nxt.args[0] is cur:
            out, v = nxt, nxt.args[1]
        else:
            continue
        sites.append(AttentionSite(
            output=out, q=mm.args[0], k=k, v=v, attn_mask=mask, is_causal=False,
            dropout_p=dropout, scale=scale, enable_gqa=False, pattern="unfused", problem=problem))
    return sites
