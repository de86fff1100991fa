"""Fixed-shape, fixed-address decode storage of one cache layer, so that decode steps replay
from CUDA graphs (``ZipVLCache(max_cache_len=N)``).

A growing layer (``kv_pool``) concatenates a new tensor every step: each step has new shapes and
new addresses, which a CUDA graph cannot replay.  After its first decode step, a layer with a
``max_cache_len`` moves its segments into buffers sized for the whole generation:

- **high-bit pool**: the slots it had, then room for every group decoding can quantize, then one
  *scratch* group; ``pos`` is -1 at empty slots (the decode kernels skip them).
- **low-bit pool**: unchanged (it never grows).
- **ring**: the residual window as ``W = round_up(residual_length, G) + G`` slots at 16 bits
  ([B, Hkv, W, d], ``pos [B, W]``, -1 empty); position ``p`` lives in slot ``p % W``.
- ``length`` [1] int64: the position the next token takes; ``next_slot`` [1] int64: the first
  free high-bit slot (a multiple of G); ``overflow`` [1] bool: a step ran past the capacity.

``append`` writes position ``t``: when its slot ``s = t % W`` starts a group region
(``s % G == 0``), the region's tokens (positions ``t - W .. t - W + G - 1``, the oldest in the
ring) are quantized into the high-bit pool at ``next_slot`` and their ring slots emptied, which
keeps at least ``residual_length`` recent tokens unquantized, as the growing layer does.  The
decision is taken on the device: every step quantizes the region of ``s`` and writes it to the
next group (flush) or to the scratch group (no flush), so each step is the same graph with no
host sync.  Past the capacity (a generation longer than ``max_cache_len``) flushes go to the
scratch group and ``overflow`` is set; ``ZipVLCache`` reports it in ``stats()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import handoff, kv_pool, quant


@dataclass
class StaticLayer:
    """One layer's fixed storage (module docstring).  ``scratch``: first slot of the scratch
    group; ``max_len``: positions the storage holds (the mask length of a step)."""

    hi: kv_pool.Pool
    lo: kv_pool.Pool | None
    ring_k: torch.Tensor
    ring_v: torch.Tensor
    ring_pos: torch.Tensor
    length: torch.Tensor
    next_slot: torch.Tensor
    overflow: torch.Tensor
    scratch: int
    max_len: int
    evicted: bool

    def tensors(self) -> list[torch.Tensor]:
        out = [self.ring_k, self.ring_v, self.ring_pos, self.length, self.next_slot,
               self.overflow, *self.hi.tensors()]
        out += list(self.lo.tensors()) if self.lo is not None else []
        return [t for t in out if t is not None]


def ring_slots(residual_length: int, group_size: int) -> int:
    return kv_pool.round_up(residual_length, group_size) + group_size


def _grow(t: torch.Tensor | None, dim: int, size: int, fill=0) -> torch.Tensor | None:
    """t padded along ``dim`` to ``size`` with ``fill``."""
    if t is None:
        return None
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_full(shape, fill)], dim=dim)


def build(hi: kv_pool.Pool, lo: kv_pool.Pool | None, res_k: torch.Tensor, res_v: torch.Tensor,
          length: int, max_len: int, residual_length: int, evicted: bool) -> StaticLayer:
    """The static storage of a growing layer holding ``length`` tokens: pools ``hi``/``lo``,
    residual res_k/res_v [B, Hkv, r, d] at positions ``length - r .. length - 1``.  Eager (not
    traced).  Every buffer is new (the inputs may be outputs of a CUDA graph, whose memory its
    next run reuses) and gets a static address for CUDA graphs."""
    G = hi.keys.group_size
    W = ring_slots(residual_length, G)
    B, Hkv, r, d = res_k.shape
    if r >= W:
        raise ValueError(f"residual window of {r} tokens exceeds the ring of {W} slots")
    groups = -(-max(max_len - length, 0) // G) + 1   # flushes that can happen before max_len
    used = hi.slots
    slots = used + groups * G
    size = slots + G                                  # + the scratch group
    kq, vq = hi.keys, hi.values  # key scales: one per group of slots; value scales: per slot
    keys = quant.Quantized(_grow(kq.data, 2, size), _grow(kq.scale, 2, size // G, 1),
                           _grow(kq.mid, 2, size // G), kq.bits, kq.group_size, kq.per_channel,
                           kq.dtype)
    values = quant.Quantized(_grow(vq.data, 2, size), _grow(vq.scale, 2, size, 1),
                             _grow(vq.mid, 2, size), vq.bits, vq.group_size, vq.per_channel,
                             vq.dtype)
    pool = kv_pool.Pool(keys, values, _grow(hi.pos, 1, size, -1))
    dev = res_k.device
    positions = torch.arange(length - r, length, device=dev)
    slot = positions % W
    # empty ring slots repeat the oldest residual token: a partly empty region quantizes
    # without widening its ranges (its empty slots stay masked by pos = -1)
    ring_k = res_k[:, :, :1].expand(B, Hkv, W, d).clone() if r else res_k.new_zeros(B, Hkv, W, d)
    ring_v = res_v[:, :, :1].expand(B, Hkv, W, d).clone() if r else res_v.new_zeros(B, Hkv, W, d)
    ring_k[:, :, slot] = res_k
    ring_v[:, :, slot] = res_v
    ring_pos = torch.full((B, W), -1, dtype=torch.int32, device=dev)
    ring_pos[:, slot] = positions.to(torch.int32)
    if lo is not None:  # a copy too: the inputs may live in a CUDA graph's reused memory
        lo = pool_from(*(t.clone() if t is not None else None for t in lo.tensors()), lo.bits,
                       lo.keys.group_size, lo.values.group_size, lo.keys.dtype)
    layer = StaticLayer(pool, lo, ring_k, ring_v, ring_pos,
                        torch.tensor([length], device=dev), torch.tensor([used], device=dev),
                        torch.zeros(1, dtype=torch.bool, device=dev), slots, max_len, evicted)
    for t in layer.tensors():
        torch._dynamo.mark_static_address(t)
    return layer


def append(layer: StaticLayer, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write one token k, v [B, Hkv, 1, d] at position ``layer.length`` (in place; module
    docstring).  Plain tensor ops with device-side decisions: traceable, capturable."""
    hi, G = layer.hi, layer.hi.keys.group_size
    W = layer.ring_pos.shape[-1]
    dev = k.device
    t = layer.length                                   # [1]
    s = t % W
    region = (s // G) * G + torch.arange(G, device=dev)  # ring slots of s's group region
    region_pos = layer.ring_pos.index_select(1, region)    # [B, G]
    flush = (s % G == 0) & (region_pos >= 0).any()
    room = layer.next_slot + G <= layer.scratch
    layer.overflow.logical_or_(flush & ~room)
    kept = flush & room                                 # the region moves into the pool
    target = torch.where(kept, layer.next_slot, layer.scratch)  # [1], group-aligned
    slots = target + torch.arange(G, device=dev)
    rk = layer.ring_k.index_select(2, region)
    rv = layer.ring_v.index_select(2, region)
    kq = quant.quantize(rk, hi.bits, G, per_channel=True)
    vq = quant.quantize(rv, hi.bits, hi.values.group_size, per_channel=False)
    hi.keys.data.index_copy_(2, slots, kq.data)
    hi.values.data.index_copy_(2, slots, vq.data)
    if hi.bits != 16:
        hi.keys.scale.index_copy_(2, target // G, kq.scale)
        hi.keys.mid.index_copy_(2, target // G, kq.mid)
        hi.values.scale.index_copy_(2, slots, vq.scale)
        hi.values.mid.index_copy_(2, slots, vq.mid)
    hi.pos.index_copy_(1, slots, torch.where(kept, region_pos, -1))
    layer.ring_pos.index_copy_(1, region, torch.where(flush, -1, region_pos))
    layer.next_slot.add_(torch.where(kept, G, 0))
    layer.ring_k.index_copy_(2, s, k)
    layer.ring_v.index_copy_(2, s, v)
    B = k.shape[0]
    layer.ring_pos.index_copy_(1, s, t.to(torch.int32).expand(B)[:, None])
    layer.length.add_(1)


def pool_from(kd, ks, km, vd, vs, vm, pos, bits, group, vgroup, dtype) -> kv_pool.Pool | None:
    """A pool from its ``Pool.tensors()`` (None when ``kd`` is None)."""
    if kd is None:
        return None
    return kv_pool.Pool(quant.Quantized(kd, ks, km, bits, group, True, dtype),
                        quant.Quantized(vd, vs, vm, bits, vgroup, False, dtype), pos)


# A Python side effect at run time (it installs storage into the cache), which a CUDA graph
# replay would skip: the graph holding it stays out of CUDA graphs.
@torch.library.custom_op("zipvl::make_static", mutates_args=(), tags=handoff.CUDAGRAPH_UNSAFE)
def make_static(token: torch.Tensor, layer: int, hk: torch.Tensor, hks: Optional[torch.Tensor],
                hkm: Optional[torch.Tensor], hv: torch.Tensor, hvs: Optional[torch.Tensor],
                hvm: Optional[torch.Tensor], hpos: torch.Tensor, lk: Optional[torch.Tensor],
                lks: Optional[torch.Tensor], lkm: Optional[torch.Tensor],
                lv: Optional[torch.Tensor], lvs: Optional[torch.Tensor],
                lvm: Optional[torch.Tensor], lpos: Optional[torch.Tensor], rk: torch.Tensor,
                rv: torch.Tensor, rpos: Optional[torch.Tensor], high_bits: int, low_bits: int,
                group: int, vgroup: int, length: int, evicted: bool) -> torch.Tensor:
    """At run time, hands the growing segments of ``layer`` (``ZipVLLayer.kernel_args()``
    order) to the cache named by ``token``, which moves them into a ``StaticLayer``.  Returns
    an empty tensor (the layer keeps it so that the op stays in the graph)."""
    cache = handoff.receiver(token)
    if cache is not None:
        hi = pool_from(hk, hks, hkm, hv, hvs, hvm, hpos, high_bits, group, vgroup, rk.dtype)
        lo = pool_from(lk, lks, lkm, lv, lvs, lvm, lpos, low_bits, group, vgroup, rk.dtype)
        cache.install_static(layer, hi, lo, rk, rv, length, evicted)
    return token.new_empty(0)


@make_static.register_fake
def _(token, layer, hk, hks, hkm, hv, hvs, hvm, hpos, lk, lks, lkm, lv, lvs, lvm, lpos, rk, rv,
      rpos, high_bits, low_bits, group, vgroup, length, evicted):
    return token.new_empty(0)
