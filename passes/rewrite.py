"""Replace one attention site by a call of ``runtime.prefill.zipvl_prefill``."""
from __future__ import annotations

import torch
from torch import fx

from ..runtime.prefill import mask_summary_for, zipvl_prefill
from .sites import AttentionSite


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, settings: dict,
                 summaries: dict | None = None) -> fx.Node:
    """Insert the ZipVL call before ``site.output`` and route every user to it.

    ``settings`` are plain keywords of ``zipvl_prefill`` (scale excluded).  ``summaries`` maps
    mask nodes to (the mask as realized once by ``zipvl::realize_mask``, its summary: valid
    tokens, mask kind): every layer of a model reads the same mask, which is materialized and
    summarized once per graph.  The replaced nodes of an unfused pattern become dead and are
    removed by the caller's dead-code elimination."""
    scale = site.scale if site.pattern == "sdpa" else float(site.scale)
    summaries = {} if summaries is None else summaries
    mask = site.attn_mask
    with gm.graph.inserting_before(site.output):
        summary = None
        if isinstance(mask, fx.Node):
            if mask not in summaries:
                realized = gm.graph.call_function(torch.ops.zipvl.realize_mask.default, (mask,))
                realized.meta.update(mask.meta)
                summaries[mask] = (realized,
                                   gm.graph.call_function(mask_summary_for, (realized, site.q)))
            mask, summary = summaries[mask]
        new = gm.graph.call_function(
            zipvl_prefill, args=(site.q, site.k, site.v, mask),
            kwargs=dict(settings, scale=scale, mask_summary=summary))
    new.meta.update(site.output.meta)
    site.output.replace_all_uses_with(new)
    gm.graph.erase_node(site.output)
    return new
