"""Hand-over of a layer's prefill importance to the KV cache (DESIGN.md section 6).

The cache marks each prompt it stores with ``zipvl::mark_prompt(k, v, token, layer)``, where
``token`` is a small tensor the cache owns (a graph input: no guard on which cache it is, so a
new cache does not recompile).  At run time the op hands the cache a copy of the prompt K/V
(``receiver.hold_prompt``), which the cache keeps only until the layer's prefill kernel hands
over its selection: from then on the layer holds its quantized pools alone, so a prefill over
a ``ZipVLCache`` never holds a full-precision copy of every layer's prompt.  The zipvl backend
finds the mark whose K/V feed a sparse prefill site and passes the token, the layer index and
those K/V to the site's kernel.  At run time the kernel looks the cache up by its token and
calls ``receiver.plan`` (device work, before the kernel's host read of the budgets, so the
pool sizes travel in the same read) and then ``receiver.adopt``: the layer's pools are built
right there, from the selection the kernel just made.  No graph break; the host-read kernel
adds no host sync of its own.  The graph-capturable kernel has no host read of its own, and
the hand-over adds none: ``zipvl::deliver_selection`` plans the split on the device and calls
``receiver.deliver``, which copies the pool sizes to the host asynchronously and builds the
pools at the next delivery (the next layer's) or when the cache is next read
(``finish_delivery``: decode, ``memory_bytes()``, ``stats()``); the op is kept out of CUDA
graphs (pools allocated during a CUDA graph tree's warm-up would sit in its private memory
pool, and a replay would skip the op).

A prompt not run through a zipvl sparse prefill (eager model, other backend, dense fallback)
is never delivered: the cache then stores every prompt token at ``high_bits``.
"""
from __future__ import annotations

import threading
import weakref
from typing import Protocol

import torch

# Tag of ops Inductor must keep out of CUDA graphs (it partitions around them, or skips CUDA
# graphs for their graph): host syncs and run-time Python side effects, which a replay skips.
CUDAGRAPH_UNSAFE = ((torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe")
                    else ())

_lock = threading.Lock()
_receivers: "weakref.WeakValueDictionary[int, Receiver]" = weakref.WeakValueDictionary()


class Receiver(Protocol):
    def hold_prompt(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None: ...

    def plan(self, layer: int, keys: torch.Tensor, kept_idx: torch.Tensor,
             budget: torch.Tensor): ...

    def adopt(self, layer: int, keys: torch.Tensor, values: torch.Tensor, plan,
              counts: list[int], site: str) -> None: ...

    def deliver(self, layer: int, keys: torch.Tensor, values: torch.Tensor, plan,
                site: str) -> None: ...

    def finish_delivery(self) -> None: ...

    def report_uniform(self, layer: int, n: int) -> None: ...


def register(token: torch.Tensor, receiver: Receiver) -> None:
    with _lock:
        _receivers[token.data_ptr()] = receiver


def finish_deliveries() -> None:
    """Every receiver's pending ``deliver`` completed (before statistics are read)."""
    with _lock:
        found = list(_receivers.values())
    for r in found:
        r.finish_delivery()


def receiver(token: torch.Tensor | None) -> Receiver | None:
    if token is None:
        return None
    with _lock:
        return _receivers.get(token.data_ptr())


@torch.library.custom_op("zipvl::mark_prompt", mutates_args=(), tags=CUDAGRAPH_UNSAFE)
def mark_prompt(keys: torch.Tensor, values: torch.Tensor, token: torch.Tensor,
                layer: int) -> torch.Tensor:
    """Names the cache (``token``) and ``layer`` that store these prompt K/V [B, Hkv, n, d],
    and at run time hands that cache copies of them (``receiver.hold_prompt``).  The cache
    drops its copy when the layer's prefill kernel hands over its selection (the pools are
    built from the kernel's own K/V), else splits it uniformly at the layer's first decode
    step.  Returns an empty tensor (the layer keeps it, so that the op stays in the graph).

    The copies are made outside CUDA graphs (this op is kept out of them): the cache holds the
    prompt past the graph's run, and memory of a CUDA graph's outputs is reused by its next
    run."""
    found = receiver(token)
    if found is not None:
        found.hold_prompt(layer, keys.clone(), values.clone())
    return token.new_empty(0)


@mark_prompt.register_fake
def _(keys, values, token, layer):
    return token.new_empty(0)


MARK = (torch.ops.zipvl.mark_prompt, torch.ops.zipvl.mark_prompt.default)


@torch.library.custom_op("zipvl::note_uniform_split", mutates_args=(), tags=CUDAGRAPH_UNSAFE)
def note_uniform_split(token: torch.Tensor, layer: int, n: int) -> torch.Tensor:
    """Tells the cache named by ``token`` (at run time, also inside compiled graphs) that
    ``layer`` split its ``n``-token prompt without importance, for ``stats()``."""
    found = receiver(token)
    if found is not None:
        found.report_uniform(layer, n)
    return token.new_empty(0)


@note_uniform_split.register_fake
def _(token, layer, n):
    return token.new_empty(0)
