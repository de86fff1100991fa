"""Replace one attention site by a call of ``runtime.prefill.zipvl_prefill``."""
from __future__ import annotations

from torch import fx

from ..runtime.prefill import zipvl_prefill
from .sites import AttentionSite


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, settings: dict) -> fx.Node:
    """Insert the ZipVL call before ``site.output`` and route every user to it.

    ``settings`` are plain keywords of ``zipvl_prefill`` (scale excluded).  The replaced nodes
    of an unfused pattern become dead and are removed by the caller's dead-code elimination."""
    scale = site.scale if site.pattern == "sdpa" else float(site.scale)
    with gm.graph.inserting_before(site.output):
        new = gm.graph.call_function(
            zipvl_prefill, args=(site.q, site.k, site.v, site.attn_mask),
            kwargs=dict(settings, scale=scale))
    new.meta.update(site.output.meta)
    site.output.replace_all_uses_with(new)
    gm.graph.erase_node(site.output)
    return new
