"""Replace one attention site by a call of ``runtime.prefill.zipvl_prefill``."""
from __future__ import annotations

import torch
from torch import fx

from ..runtime.prefill import key_padding_summary, mask_summary_for, zipvl_prefill
from .mask_source import CAUSAL_ONLY, causal_key_padding
from .sites import AttentionSite, shape


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, settings: dict,
                 summaries: dict | None = None) -> fx.Node:
    """Insert the ZipVL call before ``site.output`` and route every user to it.

    ``settings`` are plain keywords of ``zipvl_prefill`` (scale excluded).  ``summaries`` maps
    mask nodes to (the mask the rewritten sites read, its summary: valid tokens, mask kind),
    computed once per graph for every layer that shares the mask: a mask the graph builds as
    causal & key padding (``mask_source``) is replaced by None and the padding (it is never
    materialized); any other mask is realized once by ``zipvl::realize_mask`` and summarized
    at run time.  The replaced nodes of an unfused pattern become dead and are removed by the
    caller's dead-code elimination."""
    scale = site.scale if site.pattern == "sdpa" else float(site.scale)
    summaries = {} if summaries is None else summaries
    mask = site.attn_mask
    with gm.graph.inserting_before(site.output):
        summary = None
        if isinstance(mask, fx.Node):
            if mask not in summaries:
                q = shape(site.q)
                pad = causal_key_padding(mask, q[0], q[-2])
                if pad is not None:
                    summaries[mask] = (None, gm.graph.call_function(
                        key_padding_summary, (None if pad is CAUSAL_ONLY else pad, site.q)))
                else:
                    realized = gm.graph.call_function(torch.ops.zipvl.realize_mask.default,
                                                      (mask,))
                    realized.meta.update(mask.meta)
                    summaries[mask] = (realized, gm.graph.call_function(mask_summary_for,
                                                                        (realized, site.q)))
            mask, summary = summaries[mask]
        new = gm.graph.call_function(
            zipvl_prefill, args=(site.q, site.k, site.v, mask),
            kwargs=dict(settings, scale=scale, mask_summary=summary))
    new.meta.update(site.output.meta)
    site.output.replace_all_uses_with(new)
    gm.graph.erase_node(site.output)
    return new
