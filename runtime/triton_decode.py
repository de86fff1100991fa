"""Triton kernels of ``zipvl::decode_attention`` (split-K "flash decoding" over packed K/V).

Grid: one program per (sequence, KV head, chunk of slots) of each segment.  A program loads the
``g`` query heads that share its KV head (padded to 16 rows for ``tl.dot``), streams its chunk
in tiles of ``BLOCK_N`` slots, unpacks and dequantizes each tile in registers (codes, fp16 scale
and minimum; keys per channel, values per token), and keeps an online softmax.  Its partial
(max, denominator, accumulator) goes to a scratch buffer; a second kernel merges the partials
of every chunk of every segment.  Nothing of the cached length is materialized in full
precision: the scratch holds ``chunks x g x d`` floats per (sequence, KV head).

Shapes as in ``decode_attention``; d a power of two >= 16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64          # slots per tile (less when a key group is smaller)
QROWS = 16            # query rows per program (tl.dot needs >= 16)
PROGRAMS_PER_SM = 4   # partial-kernel programs launched per SM (all segments together)
NUM_STAGES = 3        # software pipelining depth of the tile loop (best of a sweep, H200)
NUM_WARPS = 4


def supported(q: torch.Tensor, segs) -> bool:
    """Head dim a power of two >= 16, at most 16 query heads per KV head, key groups a
    multiple of the tile (a tile must lie inside one group)."""
    d = q.shape[-1]
    g = q.shape[1] // segs[0].kd.shape[1]
    return (d >= 16 and d & (d - 1) == 0 and g <= QROWS and q.shape[2] == 1
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and all(s.bits == 16 or (s.group % 16 == 0 and d % s.vgroup == 0) for s in segs))


def _tile(seg) -> int:
    """Slots per tile: BLOCK_N, or less so that a tile lies inside one key group."""
    if seg.bits == 16:
        return BLOCK_N
    return next(b for b in (BLOCK_N, 32, 16) if seg.group % b == 0)


@triton.jit
def _unpack(packed, BITS: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
    """[BLOCK, D * BITS // 8] bytes -> [BLOCK, D] codes (channel c in byte c // (8 // BITS))."""
    PER: tl.constexpr = 8 // BITS
    if PER == 1:
        return packed
    shifts = (tl.arange(0, PER) * BITS).to(tl.uint8)
    codes = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (BLOCK, D))


@triton.jit
def _partials(Q, KD, KS, KL, VD, VS, VL, POS, BIAS, M_OUT, L_OUT, ACC_OUT,
              P, base, Hkv, n_heads_per_kv, chunk, chunk_offset, n_chunks_total, scale,
              s_qb, s_qh, s_kb, s_kh, s_kp, s_ksb, s_ksh, s_ksg, s_vb, s_vh, s_vp,
              s_vsb, s_vsh, s_vsp, s_pb, s_bb,
              BITS: tl.constexpr, GROUP: tl.constexpr, VGROUP: tl.constexpr, D: tl.constexpr,
              QR: tl.constexpr, BLOCK: tl.constexpr, HAS_POS: tl.constexpr,
              HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, STAGES: tl.constexpr):
    """Partial softmax of one (sequence, KV head, chunk).  Quantized keys are never
    dequantized: with per-channel scale s and minimum z constant over a tile (tiles lie inside
    one key group), q.k = (q * s).code + q.z.  Values with per-token groups spanning the head
    (VGROUP == D) likewise: p.v = (p * s_v).code + (p . z_v)."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    rows = tl.arange(0, QR)
    d = tl.arange(0, D)
    row_ok = rows < n_heads_per_kv
    q = tl.load(Q + b * s_qb + (hk * n_heads_per_kv + rows)[:, None] * s_qh + d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    m_i = tl.full([QR], float("-inf"), tl.float32)
    l_i = tl.zeros([QR], tl.float32)
    acc = tl.zeros([QR, D], tl.float32)
    kbase = KD + b * s_kb + hk * s_kh
    vbase = VD + b * s_vb + hk * s_vh
    start = c * chunk
    DP: tl.constexpr = D * BITS // 8 if BITS < 16 else D
    dp = tl.arange(0, DP)
    for off in tl.range(0, chunk, BLOCK, num_stages=STAGES):
        n = start + off + tl.arange(0, BLOCK)
        live = n < P
        if BITS == 16:
            k = tl.load(kbase + n[:, None] * s_kp + d[None, :], mask=live[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q.to(k.dtype), tl.trans(k)).to(tl.float32)
        else:
            kcode = _unpack(tl.load(kbase + n[:, None] * s_kp + dp[None, :], mask=live[:, None],
                                    other=0), BITS, BLOCK, D)
            g_off = b * s_ksb + hk * s_ksh + ((start + off) // GROUP) * s_ksg + d
            kscale = tl.load(KS + g_off).to(tl.float32)
            klow = tl.load(KL + g_off).to(tl.float32)
            q_low = tl.sum(q * klow[None, :], axis=1)  # [QR]
            if IEEE:
                s = tl.dot(q * kscale[None, :], tl.trans(kcode.to(tl.float32)),
                           input_precision="ieee")
            else:
                s = tl.dot((q * kscale[None, :]).to(Q.dtype.element_ty),
                           tl.trans(kcode.to(Q.dtype.element_ty))).to(tl.float32)
            s = s + q_low[:, None]
        s = s * scale
        if HAS_POS:
            pos = tl.load(POS + b * s_pb + n, mask=live, other=-1)
            ok = live & (pos >= 0)
        else:
            pos = base + n
            ok = live
        if HAS_BIAS:
            s += tl.load(BIAS + b * s_bb + pos, mask=ok, other=0.0)[None, :]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        if BITS == 16:
            v = tl.load(vbase + n[:, None] * s_vp + d[None, :], mask=live[:, None], other=0.0)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v).to(tl.float32)
        else:
            vcode = _unpack(tl.load(vbase + n[:, None] * s_vp + dp[None, :], mask=live[:, None],
                                    other=0), BITS, BLOCK, D)
            if VGROUP == D:  # one scale and minimum per token
                t_off = b * s_vsb + hk * s_vsh + n * s_vsp
                vscale = tl.load(VS + t_off, mask=live, other=0.0).to(tl.float32)
                vlow = tl.load(VL + t_off, mask=live, other=0.0).to(tl.float32)
                pw = p * vscale[None, :]
                if IEEE:
                    pv = tl.dot(pw, vcode.to(tl.float32), input_precision="ieee")
                else:
                    pv = tl.dot(pw.to(Q.dtype.element_ty),
                                vcode.to(Q.dtype.element_ty)).to(tl.float32)
                pv += tl.sum(p * vlow[None, :], axis=1)[:, None]
            else:
                NG: tl.constexpr = D // VGROUP
                gi = tl.arange(0, NG)
                t_off = (b * s_vsb + hk * s_vsh + n[:, None] * s_vsp + gi[None, :])
                vscale = tl.load(VS + t_off, mask=live[:, None], other=0.0).to(tl.float32)
                vlow = tl.load(VL + t_off, mask=live[:, None], other=0.0).to(tl.float32)
                vscale = tl.reshape(tl.broadcast_to(vscale[:, :, None], (BLOCK, NG, VGROUP)),
                                    (BLOCK, D))
                vlow = tl.reshape(tl.broadcast_to(vlow[:, :, None], (BLOCK, NG, VGROUP)),
                                  (BLOCK, D))
                v = vcode.to(tl.float32) * vscale + vlow
                if IEEE:
                    pv = tl.dot(p, v, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(Q.dtype.element_ty), v.to(Q.dtype.element_ty)).to(tl.float32)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    idx = (bh * QR + rows) * n_chunks_total + chunk_offset + c  # [QR]: rows, then chunks
    tl.store(M_OUT + idx, m_i, mask=row_ok)
    tl.store(L_OUT + idx, l_i, mask=row_ok)
    tl.store(ACC_OUT + idx[:, None] * D + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _merge(M, L, ACC, OUT, Hkv, n_heads_per_kv, n_chunks, s_ob, s_oh,
           D: tl.constexpr, QR: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per query head: merge the partials of every chunk of every segment."""
    bh = tl.program_id(0)
    row = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    d = tl.arange(0, D)
    first = (bh * QR + row) * n_chunks
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for c0 in tl.range(0, n_chunks, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        ok = cs < n_chunks
        m_c = tl.load(M + first + cs, mask=ok, other=float("-inf"))
        l_c = tl.load(L + first + cs, mask=ok, other=0.0)
        a_c = tl.load(ACC + (first + cs)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m_c, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_c = tl.exp(m_c - m_safe)  # [BLOCK_C]
        w_run = tl.exp(m_run - m_safe)  # [1]
        acc = acc * w_run + tl.sum(a_c * w_c[:, None], axis=0)
        l_run = l_run * w_run + tl.sum(l_c * w_c, axis=0)
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)
    tl.store(OUT + b * s_ob + (hk * n_heads_per_kv + row) * s_oh + d,
             out.to(OUT.dtype.element_ty))


def _chunking(slots: int, programs_per_chunk: int, target_programs: int,
              tile: int) -> tuple[int, int]:
    """(chunk length, number of chunks) of one segment: enough programs to fill the GPU, and
    chunks of at least 4 tiles so the merge stays small."""
    want = max(1, target_programs // max(programs_per_chunk, 1))
    chunk = max(tile * 4, triton.cdiv(triton.cdiv(slots, want), tile) * tile)
    return chunk, triton.cdiv(slots, chunk)


def decode(q: torch.Tensor, segs, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [B, H, 1, d] (d contiguous) over the segments -> [B, H, 1, dv]."""
    B, H, _, D = q.shape
    Hkv = segs[0].kd.shape[1]
    g = H // Hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    total_slots = sum(s.slots for s in segs)
    plans = []
    for seg in segs:
        share = max(1, PROGRAMS_PER_SM * sms * seg.slots // max(total_slots, 1))
        plans.append(_chunking(seg.slots, B * Hkv, share, _tile(seg)))
    n_chunks = sum(n for _, n in plans)
    m = torch.empty(B * Hkv * QROWS * n_chunks, device=q.device, dtype=torch.float32)
    den = torch.empty_like(m)
    acc = torch.empty(B * Hkv * n_chunks * QROWS * D, device=q.device, dtype=torch.float32)
    dummy = q.new_empty(1)
    offset = 0
    for seg, (chunk, count) in zip(segs, plans):
        quantized = seg.bits < 16
        ks = seg.ks if quantized else dummy
        vs = seg.vs if quantized else dummy
        pos = seg.pos if seg.pos is not None else dummy
        kstr = ks.stride() if quantized else (0, 0, 0, 0)
        vstr = vs.stride() if quantized else (0, 0, 0, 0)
        _partials[(B * Hkv, count)](
            q, seg.kd, ks, seg.kl if quantized else dummy, seg.vd, vs,
            seg.vl if quantized else dummy, pos, bias if bias is not None else dummy,
            m, den, acc, seg.slots, seg.base, Hkv, g, chunk, offset, n_chunks, scale,
            q.stride(0), q.stride(1), seg.kd.stride(0), seg.kd.stride(1), seg.kd.stride(2),
            kstr[0], kstr[1], kstr[2], seg.vd.stride(0), seg.vd.stride(1), seg.vd.stride(2),
            vstr[0], vstr[1], vstr[2], pos.stride(0) if seg.pos is not None else 0,
            bias.stride(0) if bias is not None else 0,
            BITS=seg.bits, GROUP=seg.group, VGROUP=seg.vgroup, D=D, QR=QROWS, BLOCK=_tile(seg),
            HAS_POS=seg.pos is not None, HAS_BIAS=bias is not None,
            IEEE=q.dtype == torch.float32, STAGES=NUM_STAGES, num_warps=NUM_WARPS)
        offset += count
    out = q.new_empty(B, H, 1, seg.vd.shape[-1] if seg.bits == 16 else D)
    _merge[(B * Hkv, g)](m, den, acc, out, Hkv, g, n_chunks, out.stride(0), out.stride(1),
                         D=D, QR=QROWS, BLOCK_C=32)
    return out
