"""Gluon kernel of the partial decode attention over one 2- or 4-bit segment (NVIDIA).

Same job and outputs as ``triton_decode._partials`` (a partial softmax per (sequence, KV head,
chunk of slots), merged by ``triton_decode._merge``), written in Gluon so that the register
layouts are ours instead of the compiler's: the packed codes go from global memory straight
into the registers where the tensor-core instruction (``mma.sync m16n8k16``) wants them, with
no trip through shared memory and no shuffles.  One warp per program; a program streams its
chunk in tiles of ``BN`` slots and loads the next tile's code words while it computes this one.

How, without changing the cache format (``quant``: planes, byte ``p`` of a token holds channels
``p + j * W`` of plane ``j``):

- codes are loaded as 32-bit words and turned into 16-bit floats two words at a time
  (``pairs_asm``): each output register holds the same byte of both words, so the pair an MMA
  operand register holds is chosen by which two words meet.
- scores are computed transposed, ``S^T = K Q^T`` [BN slots, HEADS]: keys are the A operand
  (slots fill the MMA's 16 rows, up to 8 query heads its 8 columns).  A thread loads 16
  contiguous bytes of one slot (8 at W = 32); the operand layout holds them once the channels
  of a plane are *relabelled* (``_key_operand``): the contraction runs over labels, and the
  queries, scales and middles are read in the same label order.  A sum over channels does not
  care about their order.
- ``P^T`` is the score tile after one ``movmatrix`` (8 x 8 transpose across the warp) per
  register (``_transposed_probabilities``).
- values are the A operand of ``O^T = V^T P^T`` [W channels, HEADS] per plane: a thread loads
  the same word of two slots (the pairs of the operand are slot pairs), channels relabelled by
  ``_value_operand``; the output is stored back by channel.

Every relabelling is a reshape and permute of a tile that moves no data (checked at compile
time: ``convert_layout(..., assert_trivial=True)``).  Each tile's ``p @ v`` starts from zero in
the tensor cores and is added to fp32 accumulators (see the comment in ``_partials``).

Shapes and formats as in ``triton_decode``; here (``supported``): codes of 2 or 4 bits with
``W = d * bits / 8`` in (32, 64) bytes per token stored contiguously, one value scale per token
(``vgroup == d``), key groups a multiple of ``TILE`` slots, 16-bit queries, at most 8 query
heads per KV head.
"""
from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from . import quant

TILE = 32                  # slots per tile (the kernel's BN; 64 spills registers)
HEADS = gl.constexpr(8)    # query heads per KV head at most (the MMA's N)
QROWS = gl.constexpr(16)   # rows per (sequence, KV head) of the partial buffers (triton_decode)
LOG2E = 1.4426950408889634


def supported(seg, q: torch.Tensor) -> bool:
    """Whether this kernel takes segment ``seg`` for queries ``q`` (module docstring)."""
    d = q.shape[-1]
    return (seg.bits in (2, 4) and d * seg.bits // 8 in (32, 64) and seg.vgroup == d
            and seg.group % TILE == 0 and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[1] // seg.kd.shape[1] <= HEADS.value and torch.version.hip is None
            and seg.kd.stride(-2) == seg.vd.stride(-2) == d * seg.bits // 8
            and seg.kd.stride(-1) == seg.vd.stride(-1) == 1 and seg.pos is not None)


def launch(q, seg, bias, scale, m, den, acc, chunk, count, offset, n_chunks,
           maxnreg: int = 0) -> None:
    """Partials of segment ``seg`` into the buffers of ``triton_decode.decode`` (chunks
    ``offset .. offset + count - 1`` of ``n_chunks``), chunks of ``chunk`` slots."""
    B, H, _, D = q.shape
    Hkv = seg.kd.shape[1]
    W = D * seg.bits // 8
    kw, vw = seg.kd.view(torch.int32), seg.vd.view(torch.int32)   # 4 code bytes per word
    dummy = q.new_empty(1)
    _partials[(B * Hkv, count)](
        q, kw, seg.ks, seg.km, vw, seg.vs, seg.vm, seg.pos,
        bias if bias is not None else dummy, m, den, acc, seg.slots, Hkv, H // Hkv, chunk,
        offset, n_chunks, scale * LOG2E, q.stride(0), q.stride(1), *kw.stride()[:2],
        *seg.ks.stride()[:3], *vw.stride()[:2], *seg.vs.stride()[:3], seg.pos.stride(0),
        bias.stride(0) if bias is not None else 0,
        BITS=seg.bits, GROUP=seg.group, D=D, W=W, HAS_BIAS=bias is not None,
        MAGIC_C=quant.float_magic(q.dtype, seg.bits)[1] + quant.middle_code(seg.bits),
        ASM=pairs_asm(seg.bits, q.dtype),
        BN=TILE, **layouts(W, TILE), num_warps=1, **({"maxnreg": maxnreg} if maxnreg else {}))


@functools.lru_cache(maxsize=None)
def layouts(W: int, BN: int) -> dict:
    """The constexpr layouts of the kernel for ``W`` bytes per token and tiles of ``BN``
    slots (one warp; cached: the dict is shared, callers only unpack it)."""
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    words = W // 4
    wb = [1 << i for i in range(words.bit_length() - 1)]     # word bits, low to high
    slots_hi = [[b, 0] for b in (8, 16, 32, 64) if b < BN]    # slot bits in registers
    # keys, (slot, word): 16 contiguous bytes per thread (8 at W = 32; one vector load), the
    # top two word bits and slots 1, 2, 4 on lanes, slots 8, 16 in registers
    key = gl.DistributedLinearLayout(
        reg_bases=[[0, b] for b in wb[:-2]] + slots_hi,
        lane_bases=[[0, wb[-2]], [0, wb[-1]], [1, 0], [2, 0], [4, 0]],
        warp_bases=[], block_bases=[], shape=[BN, words])
    # values, (slot, word): slot 1 first (pairs of slots), slots 2, 4 and words 1, 2, 4 on
    # lanes, slots 8, 16 and word 8 in registers
    value = gl.DistributedLinearLayout(
        reg_bases=[[1, 0]] + slots_hi + [[0, b] for b in wb[3:]],
        lane_bases=[[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[], block_bases=[], shape=[BN, words])
    # the queries' B operand layout [labels, heads] as a linear layout (reductions do not take
    # dot operand layouts): labels 1, 8, 16, .. in registers, 2, 4 and the heads on lanes
    queries = gl.DistributedLinearLayout(
        reg_bases=[[1, 0]] + [[b, 0] for b in (8, 16, 32) if b < W],
        lane_bases=[[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[], block_bases=[], shape=[W, HEADS.value])
    # a key group's scales or middles [W bytes] of one plane: the bytes of a thread's labels
    # are contiguous (one or two vector loads), every head lane holds the same
    pb = [1 << i for i in range(W.bit_length() - 1)]
    group = gl.DistributedLinearLayout(
        reg_bases=[[b] for b in pb[:-2]], lane_bases=[[pb[-2]], [pb[-1]], [0], [0], [0]],
        warp_bases=[], block_bases=[], shape=[W])
    operand_a = gl.DotOperandLayout(0, mma, 2)
    operand_b = gl.DotOperandLayout(1, mma, 2)
    return dict(MMA=mma, KEY=key, VALUE=value, QL=queries, GL=group, QB=operand_b,
                KA=operand_a, VA=operand_a, PB=operand_b)


@functools.lru_cache(maxsize=None)
def pairs_asm(bits: int, dtype: torch.dtype) -> str:
    """PTX turning two words of packed code bytes ``a``, ``b`` (``$N``, ``$N+1``) into 16-bit
    floats in pairs: output ``4 * j + i`` (plane j, byte i) holds the code of plane j in byte i
    of ``a`` (low half) and of ``b`` (high half): bf16 ``magic + code`` (0x43 above each code),
    fp16 the code (0x64 above it, minus 1024).  Two permutes interleave the words' bytes, then
    per plane and register a shift (after plane 0), a mask and one permute each half."""
    per = 8 // bits
    n_out = 4 * per
    a, b = f"${n_out}", f"${n_out + 1}"
    high = 0x43 if dtype == torch.bfloat16 else 0x64
    fill = f"0x{high:02X}{high:02X}{high:02X}{high:02X}"
    mask = "0x" + f"{(1 << bits) - 1:02X}" * 4
    lines = [f"prmt.b32 t0, {a}, {b}, 0x5140;", f"prmt.b32 t1, {a}, {b}, 0x7362;"]
    for j in range(per):
        for h, t in enumerate(("t0", "t1")):
            src = t
            if j:
                lines.append(f"shr.b32 x, {t}, {j * bits};")
                src = "x"
            lines.append(f"and.b32 x, {src}, {mask};")
            r0, r1 = 4 * j + 2 * h, 4 * j + 2 * h + 1
            lines.append(f"prmt.b32 ${r0}, x, {fill}, 0x4140;")
            lines.append(f"prmt.b32 ${r1}, x, {fill}, 0x4342;")
            if dtype == torch.float16:
                lines.append(f"sub.rn.f16x2 ${r0}, ${r0}, m;")
                lines.append(f"sub.rn.f16x2 ${r1}, ${r1}, m;")
    init = "mov.b32 m, 0x64006400; " if dtype == torch.float16 else ""
    return "{ .reg .b32 t0, t1, x, m; " + init + " ".join(lines) + " }"


@gluon.jit
def _unpack(x, ASM: gl.constexpr, PER: gl.constexpr, like):
    """Every plane of a tile of words [BN, W/4] (``pairs_asm``, pairs of consecutive register
    elements) as a tuple of 4 * PER tensors [BN, W/4] of ``like``'s dtype, (plane j, byte i)
    at 4 * j + i."""
    if PER == 2:
        return gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [x],
                                         dtype=(like.dtype,) * 8, is_pure=True, pack=2)
    else:
        return gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,"
                                         "=r,r,r", [x], dtype=(like.dtype,) * 16, is_pure=True,
                                         pack=2)


@gluon.jit
def _bytes(c0, c1, c2, c3, W: gl.constexpr):
    """Four [BN, W/4] tensors, byte i of each word -> [BN, W] by byte (p = 4 * word + i).
    ``join`` appends the new dimension last, so the outer join holds the low bit of i."""
    return gl.reshape(gl.join(gl.join(c0, c2), gl.join(c1, c3)), [c0.shape[0], W])


@gluon.jit
def _key_byte(k, W: gl.constexpr):
    """Byte (channel within a plane) of key label k (``_key_operand``)."""
    return ((k >> 1) & 3) * (W // 4) + (k >> 5) * 8 + (k & 1) * 4 + ((k >> 3) & 3)


@gluon.jit
def _key_operand(x, W: gl.constexpr, layout: gl.constexpr):
    """Key codes [BN slots, W bytes] -> the MMA's A operand [BN, W labels]: byte
    p = top * W/4 + mid_hi * 8 + mid_lo * 4 + low gets label
    mid_hi * 32 + low * 8 + top * 2 + mid_lo (label bit 0 = the pair ``pairs_asm`` made)."""
    BN: gl.constexpr = x.shape[0]
    x = gl.reshape(x, [BN, 4, W // 32, 2, 4])
    x = gl.permute(x, [0, 2, 4, 1, 3])
    x = gl.reshape(x, [BN, W])
    return gl.convert_layout(x, layout, assert_trivial=True)


@gluon.jit
def _value_byte(m, W: gl.constexpr):
    """Byte (channel within a plane) of value label m (``_value_operand``)."""
    return (m >> 5) * 32 + (m & 7) * 4 + ((m >> 3) & 3)


@gluon.jit
def _value_operand(x, W: gl.constexpr, layout: gl.constexpr):
    """Value codes [BN slots, W bytes] -> the MMA's A operand [W labels, BN slots]: byte
    p = high * 32 + mid * 4 + low gets label high * 32 + low * 8 + mid."""
    BN: gl.constexpr = x.shape[0]
    x = gl.reshape(x, [BN, W // 32, 8, 4])
    x = gl.permute(x, [1, 3, 2, 0])
    x = gl.reshape(x, [W, BN])
    return gl.convert_layout(x, layout, assert_trivial=True)


@gluon.jit
def _transposed_probabilities(pw, layout: gl.constexpr):
    """pw [BN slots, HEADS] (16-bit, accumulator layout) -> the same values as the B operand
    [BN, HEADS] of ``V^T P^T``: each 8 x 8 block is transposed across the warp by one
    ``movmatrix`` per register, then relabelled (slot 8a + i, head j <- label 8a + j, i)."""
    x = gl.inline_asm_elementwise("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r",
                                  [pw], dtype=pw.dtype, is_pure=True, pack=2)
    BN: gl.constexpr = pw.shape[0]
    x = gl.reshape(x, [BN // 8, 8, 8])
    x = gl.permute(x, [0, 2, 1])
    x = gl.reshape(x, [BN, HEADS])
    return gl.convert_layout(x, layout, assert_trivial=True)


@gluon.jit
def _queries(Q_COL, q_ok, qscale, k_lab, J: gl.constexpr, W: gl.constexpr):
    """Plane J of the queries [W labels, HEADS] in fp32, log2 units (scale * log2(e))."""
    ch = J * W + _key_byte(k_lab, W)
    return gl.load(Q_COL + ch[:, None], mask=q_ok, other=0.0).to(gl.float32) * qscale


@gluon.jit
def _key_labels(x, W: gl.constexpr, layout: gl.constexpr):
    """A plane's per-byte vector [W] -> by key label (``_key_operand``'s relabelling)."""
    x = gl.reshape(x, [4, W // 32, 2, 4])
    x = gl.permute(x, [1, 3, 0, 2])
    x = gl.reshape(x, [W])
    return gl.convert_layout(x, layout, assert_trivial=True)


@gluon.jit
def _group_queries(q, KS, KM, g_byte, W: gl.constexpr, MAGIC_C: gl.constexpr,
                   DT: gl.constexpr, QL: gl.constexpr, QB: gl.constexpr):
    """A plane's B operand ``qs = q * s`` [W labels, HEADS] (DT) for a key group, and its
    column terms ``sum(q * mid - (magic + c) * qs)`` [HEADS]; ``g_byte``: the plane's scale
    (middle) pointers by byte, [W] in the GL layout."""
    ks = _key_labels(gl.load(KS + g_byte), W, gl.SliceLayout(1, QL)).to(gl.float32)
    km = _key_labels(gl.load(KM + g_byte), W, gl.SliceLayout(1, QL)).to(gl.float32)
    qs = (q * ks[:, None]).to(DT)
    z = gl.sum(q * km[:, None] - MAGIC_C * qs.to(gl.float32), axis=0)
    return gl.convert_layout(qs, QB, assert_trivial=True), z


@gluon.jit
def _partials(Q, KD, KS, KM, VD, VS, VM, POS, BIAS, M_OUT, L_OUT, ACC_OUT,
              P, Hkv, n_heads_per_kv, chunk, chunk_offset, n_chunks_total, qscale,
              s_qb, s_qh, s_kb, s_kh, s_ksb, s_ksh, s_ksg, s_vb, s_vh,
              s_vsb, s_vsh, s_vsp, s_pb, s_bb,
              BITS: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr, W: gl.constexpr,
              HAS_BIAS: gl.constexpr, MAGIC_C: gl.constexpr, ASM: gl.constexpr,
              BN: gl.constexpr, MMA: gl.constexpr, KEY: gl.constexpr, VALUE: gl.constexpr,
              QL: gl.constexpr, GL: gl.constexpr, QB: gl.constexpr, KA: gl.constexpr,
              VA: gl.constexpr, PB: gl.constexpr):
    """Partial softmax (max, denominator, accumulator) of one (sequence, KV head, chunk of
    slots), ``chunk`` a multiple of GROUP; the same outputs as ``triton_decode._partials``.
    KD/VD are the codes as int32 words (strides in words).  ``qscale`` is the softmax scale
    times log2(e): scores are kept in log2 units and the max is stored back in natural-log
    units.  Scores are computed transposed, ``S^T = K Q^T`` [BN slots, HEADS]: the slots fill
    the MMA's 16 rows, the heads its 8 columns.  ``MAGIC_C``: the codes' float offset (magic,
    ``quant.float_magic``) plus the middle code (``quant.middle_code``)."""
    DT: gl.constexpr = Q.dtype.element_ty
    PER: gl.constexpr = 8 // BITS
    WORDS: gl.constexpr = W // 4
    s_kp: gl.constexpr = WORDS   # rows of codes are contiguous (``supported``): the compiler
    s_vp: gl.constexpr = WORDS   # then addresses a whole tile from one base register
    TILES: gl.constexpr = GROUP // BN
    LOG2E_C: gl.constexpr = 1.4426950408889634
    bh = gl.program_id(0)
    c = gl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    start = c * chunk
    stop = gl.minimum(start + chunk, P)

    # queries, transposed: rows = key labels, columns = heads of this KV head; kept in
    # registers, plane by plane
    k_lab = gl.arange(0, W, layout=gl.SliceLayout(1, QL))
    heads_q = gl.arange(0, HEADS, layout=gl.SliceLayout(0, QL))
    q_col = Q + b * s_qb + (hk * n_heads_per_kv + heads_q)[None, :] * s_qh
    q_ok = (heads_q < n_heads_per_kv)[None, :]
    q0 = _queries(q_col, q_ok, qscale, k_lab, 0, W)
    q1 = q0
    q2 = q0
    q3 = q0
    if PER > 1:
        q1 = _queries(q_col, q_ok, qscale, k_lab, 1, W)
    if PER > 2:
        q2 = _queries(q_col, q_ok, qscale, k_lab, 2, W)
        q3 = _queries(q_col, q_ok, qscale, k_lab, 3, W)
    g_bytes = gl.arange(0, W, layout=GL)

    k_slot = gl.arange(0, BN, layout=gl.SliceLayout(1, KEY))
    k_word = gl.arange(0, WORDS, layout=gl.SliceLayout(0, KEY))
    v_slot = gl.arange(0, BN, layout=gl.SliceLayout(1, VALUE))
    v_word = gl.arange(0, WORDS, layout=gl.SliceLayout(0, VALUE))
    k_tile = KD + b * s_kb + hk * s_kh + k_slot[:, None] * s_kp + k_word[None, :]
    v_tile = VD + b * s_vb + hk * s_vh + v_slot[:, None] * s_vp + v_word[None, :]
    slot = gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))   # rows of the score tile
    v_scale = VS + b * s_vsb + hk * s_vsh + slot * s_vsp
    v_mid = VM + b * s_vsb + hk * s_vsh + slot * s_vsp
    pos_row = POS + b * s_pb + slot

    m_i = gl.full([HEADS], float("-inf"), gl.float32, layout=gl.SliceLayout(0, MMA))
    l_i = gl.zeros([HEADS], gl.float32, layout=gl.SliceLayout(0, MMA))
    r_i = gl.zeros([HEADS], gl.float32, layout=gl.SliceLayout(0, MMA))
    acc0 = gl.zeros([W, HEADS], gl.float32, layout=MMA)
    acc1 = gl.zeros([W, HEADS], gl.float32, layout=MMA)
    acc2 = gl.zeros([W, HEADS], gl.float32, layout=MMA)
    acc3 = gl.zeros([W, HEADS], gl.float32, layout=MMA)
    zero = gl.zeros([W, HEADS], gl.float32, layout=MMA)

    # the first tile; each tile loads the next one's words before it computes (software
    # pipelining by hand: the words stay 32-bit registers across iterations)
    kx = gl.load(k_tile + start * s_kp, mask=(start + k_slot < stop)[:, None], other=0)
    vx = gl.load(v_tile + start * s_vp, mask=(start + v_slot < stop)[:, None], other=0)
    live = start + slot < stop
    pos = gl.load(pos_row + start, mask=live, other=-1)
    # positions run two tiles ahead and the mask's bias (gathered by position) one tile ahead,
    # so that no tile waits on a dependent load
    pos_next = gl.load(pos_row + start + BN, mask=start + BN + slot < stop, other=-1)
    bias = gl.zeros([BN], gl.float32, layout=gl.SliceLayout(1, MMA))
    if HAS_BIAS:
        bias = gl.load(BIAS + b * s_bb + pos, mask=pos >= 0, other=0.0) * LOG2E_C
    vsc = gl.load(v_scale + start * s_vsp, mask=live, other=0.0)
    vmd = gl.load(v_mid + start * s_vsp, mask=live, other=0.0)
    for g0 in range(start, stop, GROUP):
        g_byte = g_bytes + (b * s_ksb + hk * s_ksh + (g0 // GROUP) * s_ksg)
        qs0, z = _group_queries(q0, KS, KM, g_byte, W, MAGIC_C, DT, QL, QB)
        qs1 = qs0
        qs2 = qs0
        qs3 = qs0
        if PER > 1:
            qs1, z1 = _group_queries(q1, KS, KM, g_byte + W, W, MAGIC_C, DT, QL, QB)
            z += z1
        if PER > 2:
            qs2, z2 = _group_queries(q2, KS, KM, g_byte + 2 * W, W, MAGIC_C, DT, QL, QB)
            qs3, z3 = _group_queries(q3, KS, KM, g_byte + 3 * W, W, MAGIC_C, DT, QL, QB)
            z += z2 + z3
        z = gl.convert_layout(z, gl.SliceLayout(0, MMA))
        for t in gl.static_range(TILES):
            n0 = g0 + t * BN
            nn = n0 + BN          # the next tile (masked beyond the chunk)
            kx_next = gl.load(k_tile + nn * s_kp, mask=(nn + k_slot < stop)[:, None], other=0)
            vx_next = gl.load(v_tile + nn * s_vp, mask=(nn + v_slot < stop)[:, None], other=0)
            live_next = nn + slot < stop
            pos_next2 = gl.load(pos_row + nn + BN, mask=nn + BN + slot < stop, other=-1)
            bias_next = bias
            if HAS_BIAS:
                bias_next = gl.load(BIAS + b * s_bb + pos_next, mask=pos_next >= 0,
                                    other=0.0) * LOG2E_C
            vsc_next = gl.load(v_scale + nn * s_vsp, mask=live_next, other=0.0)
            vmd_next = gl.load(v_mid + nn * s_vsp, mask=live_next, other=0.0)
            live = n0 + slot < stop
            # scores S^T in log2 units: the planes' (magic + code) . qs, plus the column terms
            s = gl.zeros([BN, HEADS], gl.float32, layout=MMA) + z[None, :]
            if PER == 2:
                k00, k01, k02, k03, k10, k11, k12, k13 = _unpack(kx, ASM, PER, qs0)
                s = mma_v2(_key_operand(_bytes(k00, k01, k02, k03, W), W, KA), qs0, s)
                s = mma_v2(_key_operand(_bytes(k10, k11, k12, k13, W), W, KA), qs1, s)
            else:
                (k00, k01, k02, k03, k10, k11, k12, k13,
                 k20, k21, k22, k23, k30, k31, k32, k33) = _unpack(kx, ASM, PER, qs0)
                s = mma_v2(_key_operand(_bytes(k00, k01, k02, k03, W), W, KA), qs0, s)
                s = mma_v2(_key_operand(_bytes(k10, k11, k12, k13, W), W, KA), qs1, s)
                s = mma_v2(_key_operand(_bytes(k20, k21, k22, k23, W), W, KA), qs2, s)
                s = mma_v2(_key_operand(_bytes(k30, k31, k32, k33, W), W, KA), qs3, s)
            ok = live & (pos >= 0)
            if HAS_BIAS:
                s += bias[:, None]
            s = gl.where(ok[:, None], s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=0))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(s - m_safe[None, :])
            alpha = gl.exp2(m_i - m_safe)
            pw = (p * vsc.to(gl.float32)[:, None]).to(DT)
            l_i = l_i * alpha + gl.sum(p, axis=0)
            r_i = r_i * alpha + gl.sum(p * vmd.to(gl.float32)[:, None]
                                       - MAGIC_C * pw.to(gl.float32), axis=0)
            m_i = m_new
            pt = _transposed_probabilities(pw, PB)
            # each tile's p @ v starts from zero in the tensor cores and is added to the
            # running accumulators in fp32: accumulating across tiles inside the MMA lost up to
            # 30% of the output over long chunks, where magic * sum(p * s) cancels against the
            # row terms (BENCHMARKS.md, issue 3, session 10)
            a_col = alpha[None, :]
            if PER == 2:
                v00, v01, v02, v03, v10, v11, v12, v13 = _unpack(vx, ASM, PER, qs0)
                acc0 = acc0 * a_col + mma_v2(
                    _value_operand(_bytes(v00, v01, v02, v03, W), W, VA), pt, zero)
                acc1 = acc1 * a_col + mma_v2(
                    _value_operand(_bytes(v10, v11, v12, v13, W), W, VA), pt, zero)
            else:
                (v00, v01, v02, v03, v10, v11, v12, v13,
                 v20, v21, v22, v23, v30, v31, v32, v33) = _unpack(vx, ASM, PER, qs0)
                acc0 = acc0 * a_col + mma_v2(
                    _value_operand(_bytes(v00, v01, v02, v03, W), W, VA), pt, zero)
                acc1 = acc1 * a_col + mma_v2(
                    _value_operand(_bytes(v10, v11, v12, v13, W), W, VA), pt, zero)
                acc2 = acc2 * a_col + mma_v2(
                    _value_operand(_bytes(v20, v21, v22, v23, W), W, VA), pt, zero)
                acc3 = acc3 * a_col + mma_v2(
                    _value_operand(_bytes(v30, v31, v32, v33, W), W, VA), pt, zero)
            kx = kx_next
            vx = vx_next
            pos = pos_next
            pos_next = pos_next2
            bias = bias_next
            vsc = vsc_next
            vmd = vmd_next

    heads = gl.arange(0, HEADS, layout=gl.SliceLayout(0, MMA))
    h_ok = heads < n_heads_per_kv
    idx = (bh * QROWS + heads) * n_chunks_total + chunk_offset + c
    gl.store(M_OUT + idx, m_i * 0.6931471805599453, mask=h_ok)
    gl.store(L_OUT + idx, l_i, mask=h_ok)
    ch = _value_byte(gl.arange(0, W, layout=gl.SliceLayout(1, MMA)), W)
    out = ACC_OUT + idx[None, :] * D + ch[:, None]
    r_col = r_i[None, :]
    h_ok = h_ok[None, :]
    gl.store(out, acc0 + r_col, mask=h_ok)
    if PER > 1:
        gl.store(out + W, acc1 + r_col, mask=h_ok)
    if PER > 2:
        gl.store(out + 2 * W, acc2 + r_col, mask=h_ok)
        gl.store(out + 3 * W, acc3 + r_col, mask=h_ok)
