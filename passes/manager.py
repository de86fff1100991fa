"""The pass pipeline: find sites, classify them, rewrite the sparse ones, register statistics."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import fx

from ..runtime import stats
from . import classify, decode, rewrite, sites


@dataclass
class SiteDecision:
    """What the passes decided for one site of one graph."""

    name: str
    module_type: str
    phase: str
    pattern: str
    sparse: bool
    reason: str
    uid: int


class PassManager:
    """Runs the zipvl passes over one Dynamo graph.

    ``settings`` holds ``ZipVLConfig`` fields (kernel already resolved to "sdpa" or "flex")."""

    def __init__(self, settings: dict):
        self.settings = settings

    def __call__(self, gm: fx.GraphModule) -> list[SiteDecision]:
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        found = sorted(sites.find_sdpa(gm) + sites.find_unfused(gm), key=lambda s: order[s.output])
        settings = dict(self.settings)
        kernel, dense_layers = settings["kernel"], settings.pop("dense_layers", 0)
        decisions, salt, fused, prefill = [], 0, 0, 0
        marks = decode.prompt_marks(gm)
        summaries: dict = {}
        replaced: dict[fx.Node, fx.Node] = {}  # outputs of rewritten sites -> their new nodes
        for site in found:
            site = _inputs_after_rewrites(site, replaced)
            cache_kv = decode.cache_source(site)
            if cache_kv is not None:
                decisions.append(self._decode_site(gm, site, cache_kv))
                fused += decisions[-1].sparse
                continue
            reason = classify.dense_reason(site, kernel, settings["sparse_queries"])
            if not reason and _layer_index(site, prefill) < dense_layers:
                reason = f"among the first dense_layers={dense_layers} layers (config)"
            prefill += site.phase == "prefill"
            record = stats.SiteRecord(site=site.name, module=site.module_type, phase=site.phase,
                                      path="dense" if reason else "sparse", reason=reason,
                                      kernel="" if reason else kernel)
            uid = stats.register(record)
            if not reason:
                replaced[site.output] = rewrite.rewrite_site(
                    gm, site, dict(settings, site=uid, salt=salt,
                                   **decode.prompt_cache(site, marks)), summaries)
                salt += 1
            decisions.append(SiteDecision(site.name, site.module_type, site.phase, site.pattern,
                                          not reason, reason, uid))
        if salt or fused:
            gm.graph.eliminate_dead_code(is_impure_node=_keeps_effect)
            gm.recompile()
        return decisions

    def _decode_site(self, gm, site, cache_kv) -> SiteDecision:
        """An attention call reading a ZipVLCache: fused decode attention, or the dequantized
        (position-ordered) path with the reason."""
        problem = decode.fusion_problem(site)
        reason = f"reads ZipVLCache unfused (dequantized K/V): {problem}" if problem else ""
        uid = stats.register(stats.SiteRecord(
            site=site.name, module=site.module_type, phase=site.phase,
            path="dense" if problem else "fused-decode", reason=reason,
            kernel="" if problem else "zipvl::decode_attention"))
        if not problem:
            decode.rewrite(gm, site, cache_kv, uid)
        return SiteDecision(site.name, site.module_type, site.phase, site.pattern, not problem,
                            reason, uid)



def _layer_index(site: sites.AttentionSite, ordinal: int) -> int:
    """The layer of ``site``: the last integer in its module path (``layers.3.self_attn`` -> 3),
    else ``ordinal`` (how many prefill sites came before it in the graph)."""
    numbers = [int(part) for part in site.name.split(".") if part.isdigit()]
    return numbers[-1] if numbers else ordinal


def _inputs_after_rewrites(site: sites.AttentionSite, replaced: dict) -> sites.AttentionSite:
    """``site`` with inputs that were outputs of sites rewritten before it (attention feeding
    attention directly) pointing at the nodes that replaced them."""
    fields = {name: replaced[node] for name in ("q", "k", "v", "attn_mask")
              if (node := getattr(site, name)) in replaced}
    return dataclasses.replace(site, **fields) if fields else site


def _keeps_effect(node: fx.Node) -> bool:
    """DCE must keep ``node``: FX's own rule, plus in-place tensor methods (Dynamo records
    ``cache.index_copy_(...)`` as a ``call_method`` that FX considers pure: a KV cache's writes
    would be dropped once nothing reads their result)."""
    if node.is_impure():
        return True
    return (node.op == "call_method" and isinstance(node.target, str)
            and node.target.endswith("_") and not node.target.endswith("__"))
