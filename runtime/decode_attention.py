"""Decode attention over a layer's mixed-precision KV cache (``kv_pool``), and the two ops that
connect the cache to the compiler.

- ``zipvl::cache_kv`` is what ``ZipVLCache.update`` returns to the model during decoding: the
  cached K/V dequantized back into position order ``[B, Hkv, L, d]`` (the readable reference;
  what an attention call the backend cannot fuse reads).  Evicted tokens cannot be expressed
  in position order, so it refuses to run when the cache evicted any (``low_bits=0``).
- ``zipvl::decode_attention`` is what the backend's decode pass puts in place of
  ``SDPA(q, *cache_kv(...))``: one attention over the packed segments, split over the cached
  tokens, never materializing full-precision K/V of the cached length.  Triton on CUDA
  (``triton_decode``), a chunked PyTorch implementation elsewhere.

Segment arguments, in this order: high pool (k data, k scale, k mid, v data, v scale, v mid,
pos), low pool (same, all None when absent), residual k, residual v [B, Hkv, r, d], residual
positions [B, r] int32 (-1: empty slot) or None.  ``q`` is [B, H, 1, d] with ``H = g * Hkv``;
``attn_mask`` is None or [B or 1, 1, 1, L] (bool, or additive float), indexed by position;
without residual positions the window holds positions ``L - r .. L - 1`` (``L = length``); with
them (``kv_static``'s ring) ``length`` is the capacity the mask covers.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import quant, stats

CHUNK = 4096  # slots per step of the chunked PyTorch implementation


class Segment:
    """One run of cached tokens in a kernel's view.  ``pos [B, P]`` (-1: empty), or None where
    the positions are ``base + slot`` (the residual window of a growing cache).  ``residual``:
    this is the unquantized window of recent tokens (16-bit, a few hundred slots at most)."""

    def __init__(self, kd, ks, km, vd, vs, vm, pos, bits, group, vgroup, dtype, base=0,
                 residual=False):
        self.kd, self.ks, self.km, self.vd, self.vs, self.vm = kd, ks, km, vd, vs, vm
        self.pos, self.bits, self.group, self.vgroup, self.dtype = pos, bits, group, vgroup, dtype
        self.base, self.residual = base, residual

    @property
    def slots(self) -> int:
        return self.kd.shape[-2]

    def dequantize(self, start: int = 0, stop: int | None = None):
        """K, V [B, Hkv, stop - start, d] and positions [B, stop - start] of slots
        ``start:stop`` (``start`` a multiple of the key group)."""
        stop = self.slots if stop is None else stop
        sl = slice(start, stop)
        if self.bits == 16:
            k, v = self.kd[:, :, sl], self.vd[:, :, sl]
        else:
            g0, g1 = start // self.group, -(-stop // self.group)
            kq = quant.Quantized(self.kd[:, :, g0 * self.group:g1 * self.group],
                                 self.ks[:, :, g0:g1], self.km[:, :, g0:g1], self.bits,
                                 self.group, True, self.dtype)
            k = quant.dequantize(kq)[:, :, start - g0 * self.group:stop - g0 * self.group]
            vq = quant.Quantized(self.vd[:, :, sl], self.vs[:, :, sl], self.vm[:, :, sl],
                                 self.bits, self.vgroup, False, self.dtype)
            v = quant.dequantize(vq)
        if self.pos is None:
            B = k.shape[0]
            pos = torch.arange(start, stop, device=k.device)[None].expand(B, -1) + self.base
        else:
            pos = self.pos[:, sl].long()
        return k, v, pos


def segments(hk, hks, hkm, hv, hvs, hvm, hpos, lk, lks, lkm, lv, lvs, lvm, lpos, rk, rv, rpos,
             high_bits, low_bits, group, vgroup, length, evicted=False) -> list[Segment]:
    """The non-empty segments of a cache layer (``ZipVLLayer.kernel_args()`` order)."""
    dtype = rk.dtype
    out = [Segment(hk, hks, hkm, hv, hvs, hvm, hpos, high_bits, group, vgroup, dtype)]
    if lk is not None:
        out.append(Segment(lk, lks, lkm, lv, lvs, lvm, lpos, low_bits, group, vgroup, dtype))
    out.append(Segment(rk, None, None, rv, None, None, rpos, 16, group, vgroup, dtype,
                       base=length - rk.shape[-2], residual=True))
    return [s for s in out if s.slots > 0]


def mask_bias(attn_mask: Optional[torch.Tensor], B: int) -> Optional[torch.Tensor]:
    """[B or 1, 1, 1, L] bool/float mask -> additive fp32 bias [B, L] (-inf where blocked)."""
    if attn_mask is None:
        return None
    row = attn_mask.reshape(attn_mask.shape[0], attn_mask.shape[-1])
    if row.dtype == torch.bool:  # one kernel (zeros + masked_fill(~row) took three per call)
        bias = torch.where(row, 0.0, float("-inf"))
    else:
        bias = row.float()
    return bias.expand(B, -1).contiguous()


def _logits(qg, k, pos, bias, scale):
    """Scores [B, Hkv, g, N] of grouped queries qg [B, Hkv, g, d] over slots k [B, Hkv, N, d]
    at positions pos [B, N]: the mask's bias gathered by position, -inf at empty slots."""
    logits = torch.einsum("bkgd,bknd->bkgn", qg, k.float()) * scale
    if bias is not None:
        logits = logits + bias.gather(1, pos.clamp(min=0))[:, None, None]
    return logits.masked_fill(~(pos >= 0)[:, None, None], float("-inf"))


# ---- the reference: dequantize everything, then attention -------------------------------------

def reference(q, segs: list[Segment], attn_mask, scale) -> torch.Tensor:
    """Readable decode attention: every segment dequantized at once, one softmax over all
    cached slots.  q [B, H, 1, d] -> [B, H, 1, dv] (fp32 math, q's dtype out)."""
    B, H, _, d = q.shape
    parts = [s.dequantize() for s in segs]
    k = torch.cat([p[0] for p in parts], dim=2).float()
    v = torch.cat([p[1] for p in parts], dim=2).float()
    pos = torch.cat([p[2] for p in parts], dim=1)
    Hkv = k.shape[1]
    qg = q.float().view(B, Hkv, H // Hkv, d)
    logits = _logits(qg, k, pos, mask_bias(attn_mask, B), scale)
    out = torch.einsum("bkgn,bknd->bkgd", torch.softmax(logits, dim=-1), v)
    return out.reshape(B, H, 1, v.shape[-1]).to(q.dtype)


# ---- chunked PyTorch implementation (CPU, and CUDA without Triton) ---------------------------

def chunked(q, segs: list[Segment], attn_mask, scale, chunk: int = CHUNK) -> torch.Tensor:
    """Same function as ``reference``, ``chunk`` slots at a time with an online softmax."""
    B, H, _, d = q.shape
    Hkv = segs[0].kd.shape[1]
    qg = q.float().view(B, Hkv, H // Hkv, d)
    bias = mask_bias(attn_mask, B)
    m = torch.full((B, Hkv, H // Hkv, 1), float("-inf"), device=q.device)
    den = torch.zeros_like(m)
    acc = None
    for seg in segs:
        step = max(chunk // seg.group, 1) * seg.group
        for start in range(0, seg.slots, step):
            k, v, pos = seg.dequantize(start, min(start + step, seg.slots))
            logits = _logits(qg, k, pos, bias, scale)
            m_new = torch.maximum(m, logits.amax(dim=-1, keepdim=True))
            m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
            p = torch.exp(logits - m_safe)
            alpha = torch.exp(m - m_safe)
            part = torch.einsum("bkgn,bknd->bkgd", p, v.float())
            acc = part if acc is None else acc * alpha + part
            den = den * alpha + p.sum(dim=-1, keepdim=True)
            m = m_new
    out = acc / den
    return out.reshape(B, H, 1, out.shape[-1]).to(q.dtype)


# ---- ops -------------------------------------------------------------------------------------

@torch.library.custom_op("zipvl::cache_kv", mutates_args=())
def cache_kv(hk: torch.Tensor, hks: Optional[torch.Tensor], hkm: Optional[torch.Tensor],
             hv: torch.Tensor, hvs: Optional[torch.Tensor], hvm: Optional[torch.Tensor],
             hpos: torch.Tensor, lk: Optional[torch.Tensor], lks: Optional[torch.Tensor],
             lkm: Optional[torch.Tensor], lv: Optional[torch.Tensor], lvs: Optional[torch.Tensor],
             lvm: Optional[torch.Tensor], lpos: Optional[torch.Tensor], rk: torch.Tensor,
             rv: torch.Tensor, rpos: Optional[torch.Tensor], high_bits: int, low_bits: int,
             group: int, vgroup: int, length: int,
             evicted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if evicted:
        raise RuntimeError(
            "ZipVLCache evicted prompt tokens (low_bits=0), which position-ordered K/V cannot "
            "express: decode attention must run through the zipvl backend's fused decode "
            "kernel (torch.compile(..., backend='zipvl')); see zipvl_compile.stats() for why "
            "this attention call was not fused, or use low_bits > 0")
    segs = segments(hk, hks, hkm, hv, hvs, hvm, hpos, lk, lks, lkm, lv, lvs, lvm, lpos, rk, rv,
                    rpos, high_bits, low_bits, group, vgroup, length)
    B, Hkv, _, d = rk.shape
    keys = rk.new_zeros(B, Hkv, length, d)
    values = rv.new_zeros(B, Hkv, length, rv.shape[-1])
    for seg in segs:
        k, v, pos = seg.dequantize()
        ok = pos >= 0
        b, slot = ok.nonzero(as_tuple=True)
        keys[b, :, pos[b, slot]] = k.permute(0, 2, 1, 3)[b, slot]
        values[b, :, pos[b, slot]] = v.permute(0, 2, 1, 3)[b, slot]
    return keys, values


@cache_kv.register_fake
def _(hk, hks, hkm, hv, hvs, hvm, hpos, lk, lks, lkm, lv, lvs, lvm, lpos, rk, rv, rpos,
      high_bits, low_bits, group, vgroup, length, evicted):
    B, Hkv, _, d = rk.shape
    return rk.new_empty(B, Hkv, length, d), rv.new_empty(B, Hkv, length, rv.shape[-1])


# zipvl::decode_attention runs once per layer and decode step, so its host cost counts wherever
# steps are not replayed from CUDA graphs.  It is defined with torch.library.Library instead of
# torch.library.custom_op, whose Python wrappers (autograd, aliasing checks) cost 30-56 us per
# call on H100 hosts (218 vs 248 us per eager call; BENCHMARKS.md, session 9).  Inference
# only: no autograd formula; the schema is inferred from the signature, as custom_op does.
_LIB = torch.library.Library("zipvl", "FRAGMENT")


def decode_attention(q: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float,
                     hk: torch.Tensor, hks: Optional[torch.Tensor], hkm: Optional[torch.Tensor],
                     hv: torch.Tensor, hvs: Optional[torch.Tensor], hvm: Optional[torch.Tensor],
                     hpos: torch.Tensor, lk: Optional[torch.Tensor], lks: Optional[torch.Tensor],
                     lkm: Optional[torch.Tensor], lv: Optional[torch.Tensor],
                     lvs: Optional[torch.Tensor], lvm: Optional[torch.Tensor],
                     lpos: Optional[torch.Tensor], rk: torch.Tensor, rv: torch.Tensor,
                     rpos: Optional[torch.Tensor], high_bits: int, low_bits: int, group: int,
                     vgroup: int, length: int, evicted: bool, site: int = -1) -> torch.Tensor:
    """Fused decode attention: q [B, H, 1, d] over the cache segments -> [B, H, 1, dv].
    ``site``: the stats id of the attention call it replaces (-1: none); on CUDA inputs the
    Triton kernels cannot take run the chunked PyTorch loop, reported there once."""
    segs = segments(hk, hks, hkm, hv, hvs, hvm, hpos, lk, lks, lkm, lv, lvs, lvm, lpos, rk, rv,
                    rpos, high_bits, low_bits, group, vgroup, length)
    if q.is_cuda:
        from . import triton_decode
        problem = triton_decode.problem(q, segs)
        if not problem:
            return triton_decode.decode(q, segs, mask_bias(attn_mask, q.shape[0]), scale)
        stats.note_slow_kernel(site, "chunked PyTorch", f"no Triton kernel: {problem}")
    return chunked(q, segs, attn_mask, scale)


_LIB.define("decode_attention" + torch.library.infer_schema(decode_attention, mutates_args=()))
_LIB.impl("decode_attention", decode_attention, "CompositeExplicitAutograd")


@torch.library.register_fake("zipvl::decode_attention")
def _(q, attn_mask, scale, hk, hks, hkm, hv, hvs, hvm, hpos, lk, lks, lkm, lv, lvs, lvm, lpos,
      rk, rv, rpos, high_bits, low_bits, group, vgroup, length, evicted, site=-1):
    B, H, Lq, _ = q.shape
    return q.new_empty(B, H, Lq, rv.shape[-1])
