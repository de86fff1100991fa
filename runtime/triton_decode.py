"""Triton kernels of ``zipvl::decode_attention`` (split-K "flash decoding" over packed K/V).

Grid: one program per (sequence, KV head, chunk of slots) of each segment.  A program loads the
``g`` query heads that share its KV head (padded to 16 rows for ``tl.dot``), streams its chunk
in tiles of ``BLOCK_N`` slots and keeps an online softmax.  Quantized tiles are read plane by
plane (``quant``'s packing) and turned into floats with integer ops (``_plane``; for bf16 and
fp16, four codes per 32-bit register with byte permutes in inline PTX, ``quant.plane_asm``: the
kernel is bound by instructions per tile, not by bytes, BENCHMARKS.md); scales and middles are
applied outside the dot products (``_qk_plane``, ``_pv_plane``).  Its partial (max,
denominator, accumulator) goes to a scratch buffer; a second kernel merges the partials of
every chunk of every segment (and, when its grid fits in one wave, attends the residual
window itself: ``MERGE_RESIDUAL``).  Nothing of the cached length is materialized in full
precision: the scratch holds ``chunks x g x d`` floats per (sequence, KV head).
On sm_90+ the kernels of one call are chained by programmatic dependent launch (``PDL``), so
that each starts on the SMs the previous one's programs leave.

2- and 4-bit segments that ``gluon_decode.supported`` takes (bf16/fp16 queries, up to 8 query
heads per KV head, head dim 64 or 128 ...) run ``gluon_decode._partials`` instead of
``_partials``: the same partials from a kernel whose register layouts are written out
(BENCHMARKS.md, issue 3, session 10).  ``_partials`` stays for every other segment (16 and
8 bits, fp32 queries, GQA groups of 9-16 heads, ROCm, a Triton without Gluon).

Shapes as in ``decode_attention``; d a power of two >= 16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import quant

# Launch parameters: the best of sweeps on an H100 at 128K, batch 1 and 8 (BENCHMARKS.md).
BLOCK_N = 128         # slots per tile (less when a key group is smaller)
QROWS = 16            # query rows per program (tl.dot needs >= 16)
PROGRAMS_PER_SM = 4   # partial-kernel programs launched per SM (all segments together)
NUM_STAGES = 3        # software pipelining depth of the tile loop
NUM_WARPS = 4
MIN_TILES = 1         # tiles per chunk at least
# Large problems (at least this many tiles per SM, all segments together): LARGE_PROGRAMS_PER_SM
# programs per SM, compiled with at most REGISTER_CAP registers per thread, so that 4 programs
# fit on an SM instead of 2 (worth more than the spills it costs; measured in BENCHMARKS.md).
LARGE_FROM_TILES_PER_SM = 48
LARGE_PROGRAMS_PER_SM = 8
REGISTER_CAP = 128
# Below that, a 4-bit segment with 16-bit queries launches FOUR_BIT_PROGRAMS_PER_SM programs per
# SM of its own (not a share by slots) with FOUR_BIT_WARPS warps under the same register cap: no
# spills at 4 bits, and one wave of two 8-warp programs per SM instead of 4-warp ones
# (measured in BENCHMARKS.md, session 9).
FOUR_BIT_WARPS = 8            # 0: no such rule (a measurement knob)
FOUR_BIT_PROGRAMS_PER_SM = 2
USE_MAGIC = True      # integer-op code-to-float conversion (False: plain conversion; measured)
# 2- and 4-bit segments that ``gluon_decode.supported`` takes run the Gluon kernel instead of
# ``_partials``: GLUON_PROGRAMS_PER_SM[bits] one-warp programs per SM (at most as many as fit
# at once, ``gluon_decode.MAX_REGISTERS``).  Without PDL, 12 instead of 8 was 1.10x at 4 bits
# and 1.05x at 2 bits at 128K batch 8 on an H200 (session 14); with PDL the 2-bit kernel's
# programs take the SMs the 4-bit kernel's leave, and 8 at 4 bits was 1.02-1.05x at batch 8
# and the same at batch 1 (session 17).  USE_GLUON = False: every segment on ``_partials``
# (a measurement knob).
USE_GLUON = True
GLUON_PROGRAMS_PER_SM = {4: 8, 2: 12}   # by code width
# Small problems: when that rule leaves some Gluon segment with chunks of fewer than
# GLUON_SHORT_CHUNK_SLOTS slots, the Gluon segments share GLUON_SHORT_PROGRAMS_PER_SM programs
# per SM by slots instead: fewer, longer programs.  At batch 1, 4/2 on an H200 this was
# 1.08x at 64K and 128K (8 + 12 per SM gives 2048 programs of 8 tiles there, more than one
# wave) and 1.00-1.02x everywhere else measured (batch 1-8, 32K-128K, 4/2 and 4/0); a
# threshold of 512 slots lost 3% at 32K batch 8, 6 programs per SM up to 19% (BENCHMARKS.md,
# issue 3, session 18).  0: no such rule (a measurement knob).
GLUON_SHORT_CHUNK_SLOTS = 384
GLUON_SHORT_PROGRAMS_PER_SM = 8
# Launches of at most this many Gluon programs per SM (all segments of a call together) compile
# the Gluon kernel of the code widths in GLUON_UNCAPPED_BITS without
# ``gluon_decode.MAX_REGISTERS``: 2 one-warp programs per scheduler fit at up to 255 registers,
# and ptxas takes 202 at 2 bits.  At 128K batch 1, 4/2 (8 per SM by the short rule): 1.02-1.03x
# on an H200, the same elsewhere (BENCHMARKS.md, issue 3, session 25).  The kernel of session
# 26 (one flat tile loop) is faster capped at 4 bits: 1.03-1.05x at batch 1, 1.04x at 128K
# batch 8 4/0 (8 programs per SM: few too) (session 26).  0 / (): always capped (knobs).
GLUON_UNCAPPED_PROGRAMS_PER_SM = 8
GLUON_UNCAPPED_BITS = (2,)
# Outside the short rule, Gluon segments are split into chunks of whole tiles, as even as
# possible (``gluon_decode.chunk_tiles``: they differ by one tile at most and may start inside a
# key group), one per program the rule gives (each at least one key group long), instead of
# chunks of whole key groups, which leave programs unlaunched where the groups do not divide
# evenly (128K batch 8, 4/2: 1024 + 1504 programs of 1056 + 1584).  On an H200: 1.054x at 128K
# batch 8 4/2 and 1.076x at 4/0, 1.02-1.03x at 32K batch 8 (BENCHMARKS.md, issue 3, session
# 26).  Under the short rule too (GLUON_TILE_CHUNKS_SHORT): 0.96-0.99x at batch 1.  Knobs.
GLUON_TILE_CHUNKS = True
GLUON_TILE_CHUNKS_SHORT = False
# The merge: one program per query head and MERGE_BLOCK_D channels, the chunks read
# next_power_of_2(chunks) at a time up to MERGE_BLOCK_C (one program per query head took 29 us
# at 128K batch 1 over ~500 chunks, this 6 us; H100, BENCHMARKS.md).  256 instead of 128:
# the 256 chunks of 128K batch 1 in one step, 1.04x there (H200, session 20).
MERGE_BLOCK_D = 32
MERGE_BLOCK_C = 256
# The residual window (16-bit, recent tokens, at most MERGE_RESIDUAL_SLOTS slots) is attended
# inside the merge instead of by a partial kernel of its own when the merge grid fits in one
# program per SM: one launch fewer, for which every merge program of a KV head reads the
# window again (g * D / MERGE_BLOCK_D times).  4/2 on an H200: 1.09x at 32K batch 1, 1.01x
# at 128K batch 1, 0.98x at 128K batch 8 with 896 merge programs (BENCHMARKS.md, session
# 14).  MERGE_RESIDUAL = False: never (a knob); MERGE_RESIDUAL_BLOCK slots at a time.
MERGE_RESIDUAL = True
MERGE_RESIDUAL_SLOTS = 1024
MERGE_RESIDUAL_BLOCK = 64
# Programmatic dependent launch (sm_90+, CUDA): every kernel of a call after the first is
# launched behind the previous one, which lets it launch as soon as that kernel's programs have
# started (``griddepcontrol.launch_dependents``), so that its programs take the SMs the
# previous kernel's last programs leave and the merge attends the residual window while the
# partials finish.  Each of them waits (``griddepcontrol.wait``) for the kernel it was launched
# behind: a partial kernel before it exits (the partial kernels write disjoint chunks and read
# nothing the previous one writes), the merge before it reads the partials.  So every kernel
# of a call completes after the previous one, and the merge reads every partial.
PDL = True


def problem(q: torch.Tensor, segs) -> str:
    """'' when the kernels handle these inputs, else why not: head dim a power of two >= 16,
    values of the same head dim, at most 16 query heads per KV head, one query, key groups a
    multiple of 16 slots (a tile must lie inside one group), >= 16 bytes of codes per token (a
    plane of a tile must feed ``tl.dot``: head dim >= 64 at 2 bits, >= 32 at 4 bits)."""
    d = q.shape[-1]
    g = q.shape[1] // segs[0].kd.shape[1]
    if d < 16 or d & (d - 1):
        return f"head dim {d} is not a power of two >= 16"
    if g > QROWS:
        return f"{g} query heads per KV head (at most {QROWS})"
    if q.shape[2] != 1:
        return f"{q.shape[2]} queries per sequence (one per decode step)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"query dtype {q.dtype}"
    for s in segs:
        if s.bits == 16:
            if s.vd.shape[-1] != d:
                return f"value head dim {s.vd.shape[-1]} differs from the key head dim {d}"
        elif s.group % 16 or d % s.vgroup:
            return f"key group {s.group} is not a multiple of 16 or value group {s.vgroup} " \
                   f"does not divide the head dim {d}"
        elif d * s.bits // 8 < 16:
            return f"{d * s.bits // 8} bytes of {s.bits}-bit codes per token (at least 16)"
    return ""


def _tile(seg, dtype: torch.dtype) -> int:
    """Slots per tile: BLOCK_N (at most 64 with fp32 queries, whose fp32 operand tiles of 128
    slots exceed the shared memory), or less so that a tile lies inside one key group."""
    most = min(BLOCK_N, 64) if dtype == torch.float32 else BLOCK_N
    if seg.bits == 16:
        return most
    return next(b for b in (128, 64, 32, 16) if b <= most and seg.group % b == 0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, DT: tl.constexpr):
    """a @ b in fp32; operands in DT (exact fp32 products when IEEE)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _plane(packed, J: tl.constexpr, BITS: tl.constexpr, MAGIC_BITS: tl.constexpr,
           DT: tl.constexpr, ASM: tl.constexpr):
    """Plane J of packed codes [BLOCK, W] (uint8) as DT [BLOCK, W]: the code, or with MAGIC_BITS
    the float whose bits are ``MAGIC_BITS | code`` (= magic + code).  With ``ASM``
    (``quant.plane_asm``, bf16 and fp16) four bytes at a time in inline PTX; else with Triton
    ops."""
    if ASM != "":
        if DT == tl.bfloat16:
            return tl.inline_asm_elementwise(ASM, "=r,=r,r", [packed], dtype=tl.bfloat16,
                                             is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(ASM, "=r,=r,r", [packed], dtype=tl.float16,
                                             is_pure=True, pack=4)
    code = (packed >> (J * BITS)) & ((1 << BITS) - 1)
    if MAGIC_BITS:
        return (code.to(tl.int16) | MAGIC_BITS).to(DT, bitcast=True)
    return code.to(DT)


@triton.jit
def _qk_plane(q, kp, KS, KM, g_off, J: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr,
              MAGIC_BITS: tl.constexpr, MAGIC_C: tl.constexpr, IEEE: tl.constexpr,
              DT: tl.constexpr, ASM: tl.constexpr):
    """Plane J's share of the scores of q [QR, W] (its channels J*W ..) over a tile of packed
    keys kp [BLOCK, W]: ``qs . (magic + code)`` [QR, BLOCK] with qs = q * s rounded to DT, and
    the terms [QR, W] whose row sums turn it into q . k: ``q * mid - (magic + c) * qs`` (s, mid:
    the tile's per-channel scale and middle value, c the middle code, ``quant``; the caller
    sums the planes' terms first, then reduces once); MAGIC_C = magic + c."""
    c = J * W + tl.arange(0, W)
    kscale = tl.load(KS + g_off + c).to(tl.float32)
    kmid = tl.load(KM + g_off + c).to(tl.float32)
    qs = (q * kscale[None, :]).to(DT)
    s = _dot(qs, tl.trans(_plane(kp, J, BITS, MAGIC_BITS, DT, ASM)), IEEE, DT)
    z = q * kmid[None, :] - MAGIC_C * qs.to(tl.float32)
    return s, z


@triton.jit
def _pv_plane(p, pw, vp, VS, VM, t_off, live, J: tl.constexpr, W: tl.constexpr,
              BITS: tl.constexpr, CENTER: tl.constexpr, VGROUP: tl.constexpr, D: tl.constexpr,
              MAGIC_BITS: tl.constexpr, IEEE: tl.constexpr, DT: tl.constexpr,
              ASM: tl.constexpr):
    """Plane J's share [QR, W] of p @ v over a tile of packed values vp [BLOCK, W].  One scale
    per token (VGROUP == D): ``pw @ (magic + code)`` with pw = p * scale (the caller adds the
    per-row terms).  Smaller value groups: dequantize the plane (CENTER: the middle code), then
    ``p @ v``."""
    if VGROUP == D:
        return _dot(pw, _plane(vp, J, BITS, MAGIC_BITS, DT, ASM), IEEE, DT)
    gi = (J * W + tl.arange(0, W)) // VGROUP
    vscale = tl.load(VS + t_off[:, None] + gi[None, :], mask=live[:, None], other=0.0)
    vmid = tl.load(VM + t_off[:, None] + gi[None, :], mask=live[:, None], other=0.0)
    centred = _plane(vp, J, BITS, 0, tl.float32, "") - CENTER
    v = centred * vscale.to(tl.float32) + vmid.to(tl.float32)
    return _dot(p, v, IEEE, DT)


@triton.jit
def _slot_bias(POS, BIAS, b, n, live, base, s_pb, s_bb, HAS_POS: tl.constexpr,
               HAS_BIAS: tl.constexpr):
    """(the mask's additive bias [N], whether each slot holds a token [N]) of slots n [N] of
    sequence b (``live``: n is inside the segment): positions POS[b, n] (-1: empty) or, without
    POS, ``base + n``; the bias gathered by position (zeros without BIAS: callers add it
    only with BIAS)."""
    if HAS_POS:
        pos = tl.load(POS + b * s_pb + n, mask=live, other=-1)
        ok = live & (pos >= 0)
    else:
        pos = base + n
        ok = live
    bias = tl.zeros(n.shape, tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + b * s_bb + pos, mask=ok, other=0.0)
    return bias, ok


@triton.jit
def _partials(Q, KD, KS, KM, VD, VS, VM, POS, BIAS, M_OUT, L_OUT, ACC_OUT,
              P, base, Hkv, n_heads_per_kv, chunk, chunk_offset, n_chunks_total, scale,
              s_qb, s_qh, s_kb, s_kh, s_kp, s_ksb, s_ksh, s_ksg, s_vb, s_vh, s_vp,
              s_vsb, s_vsh, s_vsp, s_pb, s_bb,
              BITS: tl.constexpr, GROUP: tl.constexpr, VGROUP: tl.constexpr, D: tl.constexpr,
              QR: tl.constexpr, BLOCK: tl.constexpr, HAS_POS: tl.constexpr,
              HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, MAGIC_BITS: tl.constexpr,
              MAGIC: tl.constexpr, CENTER: tl.constexpr, STAGES: tl.constexpr,
              A0: tl.constexpr, A1: tl.constexpr, A2: tl.constexpr, A3: tl.constexpr,
              GDC_NEXT: tl.constexpr, GDC_WAIT: tl.constexpr):
    """Partial softmax of one (sequence, KV head, chunk).  Quantized keys are never
    dequantized: with per-channel scale s and middle value z constant over a tile (tiles lie
    inside one key group) and c the middle code, q.k = (q * s).(code - c) + q.z; values with one
    scale per token likewise, p.v = (p * s_v).(code - c) + p.z_v.  Codes are read plane by
    plane (``quant`` packs channel ``j * W + i`` into byte i), so a plane is one shift and mask
    of the bytes and one ``tl.dot`` of W channels; the planes' results are never interleaved
    in registers.  GDC_NEXT / GDC_WAIT: the grid-dependency steps of a programmatic dependent
    launch (``PDL``)."""
    DT: tl.constexpr = Q.dtype.element_ty
    PER: tl.constexpr = 8 // BITS if BITS < 16 else 1
    MAGIC_C: tl.constexpr = MAGIC + CENTER
    W: tl.constexpr = D // PER  # channels per plane = bytes per token when quantized
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    if GDC_NEXT:
        gdc_launch_dependents()
    rows = tl.arange(0, QR)
    w = tl.arange(0, W)
    row_ok = rows < n_heads_per_kv
    q_ptr = Q + b * s_qb + (hk * n_heads_per_kv + rows)[:, None] * s_qh + w[None, :]
    q0 = tl.load(q_ptr, mask=row_ok[:, None], other=0.0).to(tl.float32)
    q1 = q0
    q2 = q0
    q3 = q0
    if PER > 1:
        q1 = tl.load(q_ptr + W, mask=row_ok[:, None], other=0.0).to(tl.float32)
    if PER > 2:
        q2 = tl.load(q_ptr + 2 * W, mask=row_ok[:, None], other=0.0).to(tl.float32)
        q3 = tl.load(q_ptr + 3 * W, mask=row_ok[:, None], other=0.0).to(tl.float32)
    m_i = tl.full([QR], float("-inf"), tl.float32)
    l_i = tl.zeros([QR], tl.float32)
    acc0 = tl.zeros([QR, W], tl.float32)
    acc1 = tl.zeros([QR, W], tl.float32)
    acc2 = tl.zeros([QR, W], tl.float32)
    acc3 = tl.zeros([QR, W], tl.float32)
    kbase = KD + b * s_kb + hk * s_kh
    vbase = VD + b * s_vb + hk * s_vh
    start = c * chunk
    for off in tl.range(0, chunk, BLOCK, num_stages=STAGES):
        n = start + off + tl.arange(0, BLOCK)
        live = n < P
        k_tile = tl.load(kbase + n[:, None] * s_kp + w[None, :], mask=live[:, None], other=0)
        if BITS == 16:
            s = _dot(q0, tl.trans(k_tile), IEEE, DT)
        else:
            g_off = b * s_ksb + hk * s_ksh + ((start + off) // GROUP) * s_ksg
            s, z = _qk_plane(q0, k_tile, KS, KM, g_off, 0, W, BITS, MAGIC_BITS, MAGIC_C, IEEE, DT,
                             A0)
            if PER > 1:
                s1, z1 = _qk_plane(q1, k_tile, KS, KM, g_off, 1, W, BITS, MAGIC_BITS, MAGIC_C,
                                   IEEE, DT, A1)
                s += s1
                z += z1
            if PER > 2:
                s2, z2 = _qk_plane(q2, k_tile, KS, KM, g_off, 2, W, BITS, MAGIC_BITS, MAGIC_C,
                                   IEEE, DT, A2)
                s3, z3 = _qk_plane(q3, k_tile, KS, KM, g_off, 3, W, BITS, MAGIC_BITS, MAGIC_C,
                                   IEEE, DT, A3)
                s += s2 + s3
                z += z2 + z3
            s += tl.sum(z, axis=1)[:, None]  # one reduction for every plane's row terms
        s = s * scale
        bias, ok = _slot_bias(POS, BIAS, b, n, live, base, s_pb, s_bb, HAS_POS, HAS_BIAS)
        if HAS_BIAS:
            s += bias[None, :]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v_tile = tl.load(vbase + n[:, None] * s_vp + w[None, :], mask=live[:, None], other=0)
        if BITS == 16:
            acc0 = acc0 * alpha[:, None] + _dot(p, v_tile, IEEE, DT)
        else:
            t_off = b * s_vsb + hk * s_vsh + n * s_vsp
            pw = p
            row_v = tl.zeros([QR], tl.float32)
            if VGROUP == D:  # one scale and middle value per token
                vscale = tl.load(VS + t_off, mask=live, other=0.0).to(tl.float32)
                vmid = tl.load(VM + t_off, mask=live, other=0.0).to(tl.float32)
                pw = (p * vscale[None, :]).to(DT)
                zv = p * vmid[None, :] - MAGIC_C * pw.to(tl.float32)
                row_v = tl.sum(zv, axis=1)
            acc0 = acc0 * alpha[:, None] + row_v[:, None] + _pv_plane(
                p, pw, v_tile, VS, VM, t_off, live, 0, W, BITS, CENTER, VGROUP, D, MAGIC_BITS, IEEE,
                DT, A0)
            if PER > 1:
                acc1 = acc1 * alpha[:, None] + row_v[:, None] + _pv_plane(
                    p, pw, v_tile, VS, VM, t_off, live, 1, W, BITS, CENTER, VGROUP, D, MAGIC_BITS,
                    IEEE, DT, A1)
            if PER > 2:
                acc2 = acc2 * alpha[:, None] + row_v[:, None] + _pv_plane(
                    p, pw, v_tile, VS, VM, t_off, live, 2, W, BITS, CENTER, VGROUP, D, MAGIC_BITS,
                    IEEE, DT, A2)
                acc3 = acc3 * alpha[:, None] + row_v[:, None] + _pv_plane(
                    p, pw, v_tile, VS, VM, t_off, live, 3, W, BITS, CENTER, VGROUP, D, MAGIC_BITS,
                    IEEE, DT, A3)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    idx = (bh * QR + rows) * n_chunks_total + chunk_offset + c  # [QR]: rows, then chunks
    tl.store(M_OUT + idx, m_i, mask=row_ok)
    tl.store(L_OUT + idx, l_i, mask=row_ok)
    acc_ptr = ACC_OUT + idx[:, None] * D + w[None, :]
    tl.store(acc_ptr, acc0, mask=row_ok[:, None])
    if PER > 1:
        tl.store(acc_ptr + W, acc1, mask=row_ok[:, None])
    if PER > 2:
        tl.store(acc_ptr + 2 * W, acc2, mask=row_ok[:, None])
        tl.store(acc_ptr + 3 * W, acc3, mask=row_ok[:, None])
    if GDC_WAIT:   # this grid completes after the one it was launched behind
        gdc_wait()


@triton.jit
def _merge(M, L, ACC, OUT, Q, RK, RV, RPOS, BIAS, Hkv, n_heads_per_kv, n_chunks, r_slots,
           r_base, scale, s_ob, s_oh, s_qb, s_qh, s_rkb, s_rkh, s_rvb, s_rvh, s_pb, s_bb,
           D: tl.constexpr, QR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
           HAS_RES: tl.constexpr, HAS_RPOS: tl.constexpr, HAS_BIAS: tl.constexpr,
           BLOCK_R: tl.constexpr, GDC_WAIT: tl.constexpr):
    """One program per (query head, BLOCK_D channels): merge the partials of every chunk of
    every segment (split over channels so that a batch-1 call still has enough programs).
    HAS_RES: the residual window (16-bit K/V [B, Hkv, r_slots, D], slot stride D, positions
    RPOS [B, r_slots] or ``r_base + slot``) is attended here first, in fp32, instead of by a
    partial kernel of its own (each of a head's D / BLOCK_D programs computes the same
    scores: a few hundred slots).  GDC_WAIT: launched behind the partial kernels (``PDL``):
    the window is attended while they finish, the partials are read after they have."""
    bh = tl.program_id(0)
    row = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    first = (bh * QR + row) * n_chunks
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    if HAS_RES:
        ch = tl.arange(0, D)
        q = tl.load(Q + b * s_qb + (hk * n_heads_per_kv + row) * s_qh + ch).to(tl.float32)
        for r0 in tl.range(0, r_slots, BLOCK_R):
            n = r0 + tl.arange(0, BLOCK_R)
            live = n < r_slots
            k = tl.load(RK + b * s_rkb + hk * s_rkh + n[:, None] * D + ch[None, :],
                        mask=live[:, None], other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * scale  # [BLOCK_R]
            bias, ok = _slot_bias(RPOS, BIAS, b, n, live, r_base, s_pb, s_bb, HAS_RPOS,
                                  HAS_BIAS)
            if HAS_BIAS:
                s += bias
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe)  # [BLOCK_R]
            w_run = tl.exp(m_run - m_safe)
            v = tl.load(RV + b * s_rvb + hk * s_rvh + n[:, None] * D + d[None, :],
                        mask=live[:, None], other=0.0).to(tl.float32)
            acc = acc * w_run + tl.sum(p[:, None] * v, axis=0)
            l_run = l_run * w_run + tl.sum(p, axis=0)
            m_run = m_new
    if GDC_WAIT:
        gdc_wait()
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


def _gluon_decode():
    """The Gluon kernel module, or None where this Triton has no Gluon (imported once)."""
    global _GLUON
    if _GLUON is False:
        try:
            from . import gluon_decode
            _GLUON = gluon_decode
        except ImportError:
            _GLUON = None
    return _GLUON


_GLUON = False


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) on host ints (``triton.cdiv`` is a JIT function: ~15 us per call from host
    code on the CI machine, 12 calls per decode step and layer)."""
    return -(-a // b)


def _chunking(slots: int, programs_per_chunk: int, target_programs: int,
              tile: int) -> tuple[int, int]:
    """(chunk length, number of chunks) of one segment: enough programs to fill the GPU, and
    chunks of at least MIN_TILES tiles."""
    want = max(1, target_programs // max(programs_per_chunk, 1))
    chunk = max(tile * MIN_TILES, _cdiv(_cdiv(slots, want), tile) * tile)
    return chunk, _cdiv(slots, chunk)


def _gluon_programs(segs, gluon: list[bool], rows: int, sms: int) -> tuple[list[int], bool]:
    """(programs to launch for each segment on the Gluon kernel (0 for the others), whether
    the short rule gave them): GLUON_PROGRAMS_PER_SM[bits] per SM, or, when that gives chunks
    shorter than GLUON_SHORT_CHUNK_SLOTS, a share by slots of GLUON_SHORT_PROGRAMS_PER_SM per
    SM; ``rows``: sequences x KV heads."""
    own = [GLUON_PROGRAMS_PER_SM[s.bits] * sms if on else 0 for s, on in zip(segs, gluon)]
    short = any(n and _chunking(s.slots, rows, n, s.group)[0] < GLUON_SHORT_CHUNK_SLOTS
                for s, n in zip(segs, own))
    if not short:
        return own, False
    slots = sum(s.slots for s, on in zip(segs, gluon) if on)
    return [max(1, GLUON_SHORT_PROGRAMS_PER_SM * sms * s.slots // slots) if on else 0
            for s, on in zip(segs, gluon)], True


def _gluon_chunks(gluon_decode, seg, rows: int, programs: int,
                  short: bool) -> tuple[tuple[int, int], int]:
    """((tiles per chunk, chunks with one more tile), chunks per row) of a segment on the Gluon
    kernel ``gluon_decode`` given ``programs`` to launch over ``rows`` (sequences x KV heads):
    chunks of whole tiles (``GLUON_TILE_CHUNKS``, unless the short rule gave the programs),
    or of whole key groups."""
    if GLUON_TILE_CHUNKS and (GLUON_TILE_CHUNKS_SHORT or not short):
        count = max(1, min(programs // rows, seg.slots // seg.group))
        return gluon_decode.chunk_tiles(seg.slots, count), count
    chunk, count = _chunking(seg.slots, rows, programs, seg.group)
    return (chunk // gluon_decode.TILE, 0), count


def _launch(bits: int, dtype: torch.dtype, large: bool) -> tuple[int, bool, dict]:
    """(programs per SM, whether the segments share them by slots, Triton launch options) of
    one segment's partial kernel; ``large``: the whole problem has at least
    LARGE_FROM_TILES_PER_SM tiles per SM."""
    if large:
        return LARGE_PROGRAMS_PER_SM, True, {"num_warps": NUM_WARPS, "maxnreg": REGISTER_CAP}
    if FOUR_BIT_WARPS and bits == 4 and dtype in (torch.bfloat16, torch.float16):
        return (FOUR_BIT_PROGRAMS_PER_SM, False,
                {"num_warps": FOUR_BIT_WARPS, "maxnreg": REGISTER_CAP})
    return PROGRAMS_PER_SM, True, {"num_warps": NUM_WARPS}


def decode(q: torch.Tensor, segs, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [B, H, 1, d] (d contiguous) over the segments -> [B, H, 1, dv]."""
    B, H, _, D = q.shape
    Hkv = segs[0].kd.shape[1]
    g = H // Hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    props = torch.cuda.get_device_properties(q.device) if q.is_cuda else None
    sms = props.multi_processor_count if props is not None else 4
    block_d = min(D, MERGE_BLOCK_D)
    merge_grid = (B * Hkv, g, D // block_d)
    one_wave = merge_grid[0] * merge_grid[1] * merge_grid[2] <= sms
    res = segs[-1] if _in_merge(segs[-1], D, one_wave) else None
    segs = segs[:-1] if res is not None else segs
    total_slots = sum(s.slots for s in segs)
    tile_of = [_tile(s, q.dtype) for s in segs]
    tiles = sum(B * Hkv * _cdiv(s.slots, tile) for s, tile in zip(segs, tile_of))
    large = tiles >= LARGE_FROM_TILES_PER_SM * sms
    gluon_decode = _gluon_decode() if USE_GLUON else None
    gluon = [gluon_decode is not None and gluon_decode.supported(s, q) for s in segs]
    gluon_programs, short = _gluon_programs(segs, gluon, B * Hkv, sms)
    plans = []  # (chunk length, number of chunks, tile, launch options) per segment (Gluon:
    # the chunk length as (tiles per chunk, chunks with one more), ``gluon_decode.launch``)
    for seg, tile, on_gluon, programs in zip(segs, tile_of, gluon, gluon_programs):
        if on_gluon:
            plans.append((*_gluon_chunks(gluon_decode, seg, B * Hkv, programs, short), tile,
                          {}))
            continue
        per_sm, by_slots, options = _launch(seg.bits, q.dtype, large)
        share = per_sm * sms * seg.slots // max(total_slots, 1) if by_slots else per_sm * sms
        share = max(1, share)
        plans.append((*_chunking(seg.slots, B * Hkv, share, tile), tile, options))
    n_chunks = sum(n for _, n, _, _ in plans)
    few = sum(gluon_programs) <= GLUON_UNCAPPED_PROGRAMS_PER_SM * sms
    pdl = PDL and props is not None and torch.version.hip is None and props.major >= 9
    # (launched behind the previous kernel, a kernel follows) of the i-th kernel of the call
    steps = [(pdl and i > 0, pdl and i < len(plans)) for i in range(len(plans) + 1)]
    # (one element at least: no chunks when the residual window is the whole cache)
    m = torch.empty(max(1, B * Hkv * QROWS * n_chunks), device=q.device, dtype=torch.float32)
    den = torch.empty_like(m)
    acc = torch.empty(max(1, B * Hkv * n_chunks * QROWS * D), device=q.device,
                      dtype=torch.float32)
    dummy = q.new_empty(1)
    offset = 0
    for seg, (chunk, count, tile, options), on_gluon, step in zip(segs, plans, gluon, steps):
        if on_gluon:  # chunk: (tiles per chunk, chunks with one more)
            gluon_decode.launch(q, seg, bias, scale, m, den, acc, chunk, count, offset,
                                n_chunks, step, not (few and seg.bits in GLUON_UNCAPPED_BITS))
            offset += count
            continue
        quantized = seg.bits < 16
        ks = seg.ks if quantized else dummy
        vs = seg.vs if quantized else dummy
        pos = seg.pos if seg.pos is not None else dummy
        kstr = ks.stride() if quantized else (0, 0, 0, 0)
        vstr = vs.stride() if quantized else (0, 0, 0, 0)
        magic_bits, magic = quant.float_magic(q.dtype, seg.bits) if USE_MAGIC else (0, 0.0)
        # bf16's PTX yields magic + code, so it goes with the magic; fp16's yields the code.
        # PTX is NVIDIA only: ROCm builds take the Triton-op conversion.
        use_asm = torch.version.hip is None and (magic_bits or q.dtype != torch.bfloat16)
        asm = {f"A{j}": quant.plane_asm(seg.bits, j, q.dtype) if use_asm else ""
               for j in range(4)}
        _partials[(B * Hkv, count)](
            q, seg.kd, ks, seg.km if quantized else dummy, seg.vd, vs,
            seg.vm if quantized else dummy, pos, bias if bias is not None else dummy,
            m, den, acc, seg.slots, seg.base, Hkv, g, chunk, offset, n_chunks, scale,
            q.stride(0), q.stride(1), seg.kd.stride(0), seg.kd.stride(1), seg.kd.stride(2),
            kstr[0], kstr[1], kstr[2], seg.vd.stride(0), seg.vd.stride(1), seg.vd.stride(2),
            vstr[0], vstr[1], vstr[2], pos.stride(0) if seg.pos is not None else 0,
            bias.stride(0) if bias is not None else 0,
            BITS=seg.bits, GROUP=seg.group, VGROUP=seg.vgroup, D=D, QR=QROWS, BLOCK=tile,
            HAS_POS=seg.pos is not None, HAS_BIAS=bias is not None,
            IEEE=q.dtype == torch.float32, MAGIC_BITS=magic_bits, MAGIC=magic,
            CENTER=quant.middle_code(seg.bits) if quantized else 0.0,
            STAGES=NUM_STAGES, GDC_NEXT=step[1], GDC_WAIT=step[0], launch_pdl=step[0],
            **options, **asm)
        offset += count
    out = q.new_empty(B, H, 1, D)
    if res is not None:
        rk, rv, rpos, r_slots, r_base = res.kd, res.vd, res.pos, res.slots, res.base
        r_strides = (*rk.stride()[:2], *rv.stride()[:2])
    else:
        rk = rv = rpos = None
        r_slots = r_base = 0
        r_strides = (0, 0, 0, 0)
    block_c = max(16, min(MERGE_BLOCK_C, triton.next_power_of_2(n_chunks)))
    _merge[merge_grid](
        m, den, acc, out, q, *(t if t is not None else dummy for t in (rk, rv, rpos, bias)),
        Hkv, g, n_chunks, r_slots, r_base, scale, out.stride(0), out.stride(1), q.stride(0),
        q.stride(1), *r_strides, rpos.stride(0) if rpos is not None else 0,
        bias.stride(0) if bias is not None else 0, D=D, QR=QROWS, BLOCK_C=block_c,
        BLOCK_D=block_d, HAS_RES=res is not None, HAS_RPOS=rpos is not None,
        HAS_BIAS=bias is not None, BLOCK_R=MERGE_RESIDUAL_BLOCK, GDC_WAIT=steps[-1][0],
        launch_pdl=steps[-1][0])
    return out


def _in_merge(seg, d: int, one_wave: bool) -> bool:
    """Whether the merge attends segment ``seg`` itself (``MERGE_RESIDUAL``): the residual
    window, at most MERGE_RESIDUAL_SLOTS slots of d contiguous channels each, and a merge grid
    of at most one program per SM (``one_wave``)."""
    return (MERGE_RESIDUAL and one_wave and seg.residual and seg.slots <= MERGE_RESIDUAL_SLOTS
            and all(t.stride(-1) == 1 and t.stride(-2) == d and t.shape[-1] == d
                    for t in (seg.kd, seg.vd)))
