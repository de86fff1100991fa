"""Gluon kernel of the partial decode attention over one 2- or 4-bit segment (NVIDIA).

Same job and outputs as ``triton_decode._partials`` (a partial softmax per (sequence, KV head,
chunk of slots), merged by ``triton_decode._merge``), written in Gluon so that the register
layouts are ours instead of the compiler's: the packed codes go from memory straight into the
registers where the tensor-core instruction (``mma.sync m16n8k16``) wants them, with no
shuffles.  One warp per program; a program streams its chunk in tiles of ``BN`` slots through
a ring of ``STAGES`` tiles in shared memory, filled by async copies (``cp.async``) ``STAGES - 1``
tiles ahead of the tile it computes (``_issue``).  Loads into registers one tile ahead were
moved by ptxas next to their use, so every tile waited on memory (profiled on an H200:
BENCHMARKS.md, issue 3, session 13); a copy into shared memory cannot be moved past its wait.

How, without changing the cache format (``quant``: planes, byte ``p`` of a token holds channels
``p + j * W`` of plane ``j``):

- codes are read as 32-bit words and turned into 16-bit floats two words at a time
  (``quant.pairs_asm``): each output register holds the same byte of both words, so the pair an
  MMA operand register holds is chosen by which two words meet.  4-bit codes become fp16 in place
  (``quant.fp16_pairs_asm``, ``FP16_FOUR_BIT``) whatever the queries' dtype, and the
  MMAs of those segments run in fp16: the queries are scaled per head so that ``q * s`` fits
  fp16, the value offsets enter each tile's MMA (``_partials``).
- scores are computed transposed, ``S^T = K Q^T`` [BN slots, HEADS]: keys are the A operand
  (slots fill the MMA's 16 rows, up to 8 query heads its 8 columns).  A thread reads 16
  contiguous bytes of one slot (8 at W = 32); the operand layout holds them once the channels
  of a plane are *relabelled* (``_key_operand``): the contraction runs over labels, and the
  queries, scales and middles are read in the same label order.  A sum over channels does not
  care about their order.
- ``P^T`` is the score tile after one ``movmatrix`` (8 x 8 transpose across the warp) per
  register (``_transposed_probabilities``).
- values are the A operand of ``O^T = V^T P^T`` [W channels, HEADS] per plane: a thread reads
  the same word of two slots (the pairs of the operand are slot pairs), channels relabelled by
  ``_value_operand``; the output is stored back by channel.  A stage of value words is laid
  out in shared memory so that this read has no bank conflicts (``layouts``: ``VSMEM``).

Every relabelling is a reshape and permute of a tile that moves no data (checked at compile
time: ``convert_layout(..., assert_trivial=True)``).  Each tile's ``p @ v`` starts from zero in
the tensor cores and is added to fp32 accumulators (see the comment in ``_partials``).

Shapes and formats as in ``triton_decode``; here (``supported``): codes of 2 or 4 bits with
``W = d * bits / 8`` in (32, 64) bytes per token stored contiguously, one value scale per token
(``vgroup == d``), key groups a multiple of ``TILE`` slots, 16-bit queries, at most 8 query
heads per KV head, and fp16 scales and middles that can be copied as int32 pairs (contiguous
over a key group's channels and over slots, at even offsets).
"""
from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import quant

TILE = 32                  # slots per tile (the kernel's BN; 64 is no faster, session 15)
STAGES = 2                 # tiles in flight per program (the ring of async copies)
# Register cap per code width (0: ptxas' choice).  A scheduler of an SM holds 16K registers:
# at more than 168 registers per thread it fits 2 one-warp programs, at 168 or fewer 3, so that
# 12 programs can share an SM (their rings fit its shared memory; how many are launched:
# ``triton_decode.GLUON_PROGRAMS_PER_SM``).  With the queries in shared memory and the tiles
# of a key group in a runtime loop, ptxas takes 157 registers at 4 bits under the cap (168
# without it; 168 with session 24's fp16 conversion) and at 2 bits, with the sums kept per
# slot (``SUM_LATE``), 168 (208 without it), with no spills (H200, BENCHMARKS.md, issue 3,
# sessions 14, 15 and 19; offline sm_90 compiles with Triton 3.6's ptxas).  With other warps
# to switch to, a ring of 2 (one tile ahead) is as fast as 3 or 4 (session 14).  Launches of
# few programs per SM compile without it (``triton_decode.GLUON_UNCAPPED_PROGRAMS_PER_SM``, at
# the code widths of ``triton_decode.GLUON_UNCAPPED_BITS``).
MAX_REGISTERS = {4: 168, 2: 168}
# Per code width: the tile's running sums over slots (softmax denominator, value column terms)
# kept per slot and reduced across lanes once per program instead of once per tile.  At 2 bits
# 1.04x at 128K batch 1 on 4/2 (H200, BENCHMARKS.md, issue 3, session 19); at 4 bits 0.97x
# then, 1.01-1.03x since the fp16 conversion moved the value terms into the MMAs (session 24).
SUM_LATE = {4: True, 2: True}
# 4-bit codes into fp16 in place whatever the queries' dtype (``quant.fp16_pairs_asm``:
# 12 instructions per 16 codes instead of 16; with bf16 queries the MMAs then run in fp16):
# see ``_partials``.  False: 4-bit codes as 2-bit ones (a measurement knob).
FP16_FOUR_BIT = True
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
            and seg.kd.stride(-1) == seg.vd.stride(-1) == 1 and seg.pos is not None
            and seg.ks.stride(-1) == seg.km.stride(-1) == 1 and seg.slots % 2 == 0
            and all(t.stride(-2) == 1 and t.stride(0) % 2 == 0 and t.stride(1) % 2 == 0
                    and t.storage_offset() % 2 == 0 for t in (seg.vs, seg.vm))
            and all(t.stride(i) % 2 == 0 and t.storage_offset() % 2 == 0
                    for t in (seg.ks, seg.km) for i in range(3)))


def chunk_tiles(slots: int, count: int) -> tuple[int, int]:
    """(per, extra) of ``slots`` slots split into ``count`` chunks of whole tiles as evenly as
    possible: chunk ``c`` spans ``per + (c < extra)`` tiles of ``TILE`` slots (``_partials``),
    so that chunks differ by one tile at most; ``1 <= count <= ceil(slots / TILE)``."""
    tiles = -(-slots // TILE)
    if not 1 <= count <= tiles:
        raise ValueError(f"count must be in [1, {tiles}] for {slots} slots (got {count})")
    return tiles // count, tiles % count


def launch(q, seg, bias, scale, m, den, acc, tiles, count, offset, n_chunks,
           pdl: tuple[bool, bool] = (False, False), capped: bool = True) -> None:
    """Partials of segment ``seg`` into the buffers of ``triton_decode.decode`` (chunks
    ``offset .. offset + count - 1`` of ``n_chunks``); ``tiles`` = (per, extra): chunk ``c``
    of a row spans ``per + (c < extra)`` tiles of ``TILE`` slots (``chunk_tiles``), clipped
    at the segment's end, and may start inside a key group.  ``pdl``:
    (launched behind the previous kernel of the call, a kernel of the call follows), as
    ``triton_decode.PDL`` decides; ``capped``: compiled under ``MAX_REGISTERS`` (False: few
    programs per SM are launched, ``triton_decode.GLUON_UNCAPPED_PROGRAMS_PER_SM``)."""
    B, H, _, D = q.shape
    Hkv = seg.kd.shape[1]
    kw, vw = seg.kd.view(torch.int32), seg.vd.view(torch.int32)   # 4 code bytes per word
    # fp16 scales and middles copied as int32 pairs (two channels of a key group, two slots)
    ks, km = seg.ks.view(torch.int32), seg.km.view(torch.int32)
    vs, vm = (t.squeeze(-1).view(torch.int32) for t in (seg.vs, seg.vm))
    dummy = q.new_empty(1)
    _partials[(B * Hkv, count)](
        q, kw, ks, km, vw, vs, vm, seg.pos,
        bias if bias is not None else dummy, m, den, acc, seg.slots, Hkv, H // Hkv, *tiles,
        offset, n_chunks, scale * LOG2E, q.stride(0), q.stride(1), *kw.stride()[:2],
        *ks.stride()[:3], *vw.stride()[:2], *vs.stride()[:2], seg.pos.stride(0),
        bias.stride(0) if bias is not None else 0,
        **constants(seg.bits, q.dtype, D, seg.group, bias is not None),
        GDC_NEXT=pdl[1], GDC_WAIT=pdl[0], launch_pdl=pdl[0], **options(seg.bits, capped))


def constants(bits: int, dtype: torch.dtype, d: int, group: int, has_bias: bool) -> dict:
    """The constexprs of ``_partials`` but the grid-dependency flags, for codes of ``bits``
    bits, 16-bit queries of ``dtype`` and head dim ``d`` (also what an offline compile of the
    kernel passes)."""
    W = d * bits // 8
    return dict(BITS=bits, GROUP=group, D=d, W=W, HAS_BIAS=has_bias,
                **plane_constants(bits, dtype), BN=TILE, NS=STAGES, SUM_LATE=SUM_LATE[bits],
                **layouts(W, TILE))


def options(bits: int, capped: bool = True) -> dict:
    """Launch options of ``_partials`` for codes of ``bits`` bits; ``capped``: under
    ``MAX_REGISTERS`` (else ptxas' choice)."""
    cap = MAX_REGISTERS[bits] if capped else 0
    return {"num_warps": 1, **({"maxnreg": cap} if cap else {})}


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
    lanes = gl.BlockedLayout([1], [32], [1], [0])   # small rows: one element per lane
    # a stage of value words in shared memory, (slot, word) per offset bit: the bits a VALUE
    # read spreads over lanes (words 1, 2, 4, slots 2, 4) are the bank bits, so that read is
    # free of bank conflicts; the words a copy moves at once (16 or 8 bytes) stay contiguous
    v_smem = gl.SharedLinearLayout(
        offset_bases=[[0, 1], [0, 2], [0, 4], [2, 0], [4, 0]] + [[0, b] for b in wb[3:]]
        + [[1, 0]] + slots_hi)
    # the copy into it: a thread moves 4 (W = 64) or 2 (W = 32) contiguous words; the lanes
    # of one store phase (8 or 16 lanes) cover the bank bits
    vector = [[0, b] for b in wb[:-2]]
    v_copy = gl.DistributedLinearLayout(
        reg_bases=vector + slots_hi,
        lane_bases=([[0, 4], [2, 0], [4, 0], [1, 0], [0, 8]] if words == 16
                    else [[0, 2], [0, 4], [2, 0], [4, 0], [1, 0]]),
        warp_bases=[], block_bases=[], shape=[BN, words])
    return dict(MMA=mma, KEY=key, VALUE=value, QL=queries, GL=group, QB=operand_b,
                KA=operand_a, VA=operand_a, PB=operand_b, LANES=lanes, VSMEM=v_smem,
                VCOPY=v_copy)


def plane_constants(bits: int, dtype: torch.dtype) -> dict:
    """The constexprs of ``_partials`` that describe the code conversion.  ``F16``: 4-bit codes
    into fp16 (``FP16_FOUR_BIT``).  Keys: ``KASM`` (the conversion), ``MAGIC_C`` (plane 0's
    float offset plus the middle code) and ``DM1..DM3`` (plane 0's offset minus plane j's; 0
    past the last plane).  Values: ``VASM``, and without F16 the same offsets (with F16 their
    offsets enter each tile's MMA instead: ``_partials``).  ``VB1``: plane 1's code step
    (codes come as ``VBASE + VB1 * c``; 1 without F16).  ``MID``: the middle code."""
    mid = quant.middle_code(bits)
    if FP16_FOUR_BIT and bits == 4:
        base, steps = quant.FP16_BASE, quant.fp16_steps(4)
        asm = quant.fp16_pairs_asm(4)
        # plane 1's 1024 + 16 c is 16 * (64 + c): offset 64 with the operand scaled by 1/16
        return dict(F16=True, KASM=asm, VASM=asm, MAGIC_C=base + mid,
                    DM1=base - base / steps[1], DM2=0.0, DM3=0.0, VB1=steps[1], VBASE=base,
                    MID=mid)
    offsets = quant.plane_offsets(bits, dtype) + (0.0,) * (4 - 8 // bits)
    dm = {f"DM{j}": offsets[0] - offsets[j] if j < 8 // bits else 0.0 for j in (1, 2, 3)}
    asm = quant.pairs_asm(bits, dtype)
    return dict(F16=False, KASM=asm, VASM=asm, MAGIC_C=offsets[0] + mid, **dm, VB1=1.0,
                VBASE=0.0, MID=mid)


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
def _queries(Q_COL, q_ok, k_lab, J: gl.constexpr, W: gl.constexpr):
    """Plane J of the queries [W labels, HEADS] (their dtype; zeros past the KV head's
    query heads)."""
    ch = J * W + _key_byte(k_lab, W)
    return gl.load(Q_COL + ch[:, None], mask=q_ok, other=0.0)


@gluon.jit
def _key_labels(x, W: gl.constexpr, layout: gl.constexpr):
    """A plane's per-byte vector [W] -> by key label (``_key_operand``'s relabelling)."""
    x = gl.reshape(x, [4, W // 32, 2, 4])
    x = gl.permute(x, [1, 3, 0, 2])
    x = gl.reshape(x, [W])
    return gl.convert_layout(x, layout, assert_trivial=True)


@gluon.jit
def _group_queries(q, ks_plane, km_plane, W: gl.constexpr, MAGIC_C: gl.constexpr,
                   DT: gl.constexpr, QL: gl.constexpr, QB: gl.constexpr, GL: gl.constexpr,
                   SC: gl.constexpr = 1.0):
    """A plane's B operand ``qs = q * s`` [W labels, HEADS] (DT) for a key group, and its
    column terms ``sum(q * mid - MAGIC_C * qs)`` [HEADS], ``MAGIC_C`` the plane's float offset
    plus the middle code; ``ks_plane``/``km_plane``: the plane's scales and middles [W] (fp16,
    by byte) in shared memory."""
    ks = _key_labels(ks_plane.load(GL), W, gl.SliceLayout(1, QL)).to(gl.float32)
    km = _key_labels(km_plane.load(GL), W, gl.SliceLayout(1, QL)).to(gl.float32)
    qs = (q * ks[:, None] * SC).to(DT)
    z = gl.sum(q * km[:, None] - (MAGIC_C / SC) * qs.to(gl.float32), axis=0)
    return gl.convert_layout(qs, QB, assert_trivial=True), z


@gluon.jit
def _issue(i, start, stop, k_buf, v_buf, pos_buf, vs_buf, vm_buf, ks_buf, km_buf,
           k_src, v_src, k_slot, vc_slot, pos_src, j_slot, vs_src, vm_src, j_pair, ks_src,
           km_src, j_ch, s_ksg, BN: gl.constexpr, GROUP: gl.constexpr, NS: gl.constexpr,
           WORDS: gl.constexpr, FIRST: gl.constexpr = False):
    """Start the async copies of tile ``i`` of the chunk (slots ``start + i * BN ..``, masked
    at ``stop``: masked elements are zero-filled) into ring stage ``i % NS``: code words,
    positions, value scales and middles, and, for the first tile of a key group or of the
    chunk (``FIRST``: tile 0), the group's key scales and middles.  One commit group per
    tile."""
    n0 = start + i * BN
    st = i % NS
    async_copy.async_copy_global_to_shared(k_buf.index(st), k_src + n0 * WORDS,
                                           mask=(n0 + k_slot < stop)[:, None])
    async_copy.async_copy_global_to_shared(v_buf.index(st), v_src + n0 * WORDS,
                                           mask=(n0 + vc_slot < stop)[:, None])
    async_copy.async_copy_global_to_shared(pos_buf.index(st), pos_src + n0,
                                           mask=n0 + j_slot < stop)
    pair_ok = n0 + 2 * j_pair < stop
    async_copy.async_copy_global_to_shared(vs_buf.index(st), vs_src + n0 // 2, mask=pair_ok)
    async_copy.async_copy_global_to_shared(vm_buf.index(st), vm_src + n0 // 2, mask=pair_ok)
    if (FIRST | ((n0 % GROUP) == 0)) & (n0 < stop):
        g_off = (n0 // GROUP) * s_ksg
        async_copy.async_copy_global_to_shared(ks_buf.index(st), ks_src + g_off)
        async_copy.async_copy_global_to_shared(km_buf.index(st), km_src + g_off)
    async_copy.commit_group()


@gluon.jit
def _partials(Q, KD, KS, KM, VD, VS, VM, POS, BIAS, M_OUT, L_OUT, ACC_OUT,
              P, Hkv, n_heads_per_kv, per, extra, chunk_offset, n_chunks_total, qscale,
              s_qb, s_qh, s_kb, s_kh, s_ksb, s_ksh, s_ksg, s_vb, s_vh,
              s_vsb, s_vsh, s_pb, s_bb,
              BITS: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr, W: gl.constexpr,
              HAS_BIAS: gl.constexpr, MAGIC_C: gl.constexpr, DM1: gl.constexpr,
              DM2: gl.constexpr, DM3: gl.constexpr, F16: gl.constexpr, KASM: gl.constexpr,
              VASM: gl.constexpr, VB1: gl.constexpr, VBASE: gl.constexpr, MID: gl.constexpr,
              BN: gl.constexpr, NS: gl.constexpr, SUM_LATE: gl.constexpr,
              MMA: gl.constexpr, KEY: gl.constexpr,
              VALUE: gl.constexpr, QL: gl.constexpr, GL: gl.constexpr, QB: gl.constexpr,
              KA: gl.constexpr, VA: gl.constexpr, PB: gl.constexpr, LANES: gl.constexpr,
              VSMEM: gl.constexpr, VCOPY: gl.constexpr, GDC_NEXT: gl.constexpr,
              GDC_WAIT: gl.constexpr):
    """Partial softmax (max, denominator, accumulator) of one (sequence, KV head, chunk of
    slots): chunk ``c`` spans ``per + (c < extra)`` tiles from tile ``c * per + min(c, extra)``
    (``chunk_tiles``), clipped at ``P``; the same outputs as ``triton_decode._partials``.
    KD/VD are the codes as int32 words, KS/KM [.., groups, D/2] and VS/VM [.., slots/2] the
    fp16 scales and middles as int32 pairs (strides in words).  Tiles stream through a ring of
    NS stages in shared memory filled by async copies NS - 1 tiles ahead (``_issue``; why: the
    module docstring).  ``qscale`` is the softmax scale times log2(e):
    scores are kept in log2 units and the max is stored back in natural-log units.  Scores are
    computed transposed, ``S^T = K Q^T`` [BN slots, HEADS]: the slots fill the MMA's 16 rows,
    the heads its 8 columns.  ``MAGIC_C``: plane 0's float offset (``quant.plane_offsets``)
    plus the middle code (``quant.middle_code``); ``DM1..DM3``: plane 0's offset minus plane
    j's (the key column terms of plane j use ``MAGIC_C - DMj``; the values' plane j adds
    ``DMj * sum(p * s)``, which one more running sum carries when any is non-zero).  ``F16``
    (``plane_constants``): fp16 MMA operands for 4-bit codes that come as ``VBASE + b_j * c``
    (b_0 = 1, b_1 = VB1): the keys' plane-1 operand is scaled by KS1 = 1 / VB1, the queries
    per head so that ``q * s`` fits fp16, and the value offsets enter each tile's MMA (no
    running row sums).  ``SUM_LATE``: the running sums over slots are reduced once, after
    the loop (``SUM_LATE`` at module level).  GDC_NEXT / GDC_WAIT: the grid-dependency steps
    of a programmatic dependent launch (``triton_decode.PDL``)."""
    QT: gl.constexpr = Q.dtype.element_ty
    DT: gl.constexpr = gl.float16 if F16 else QT     # the MMAs' 16-bit operands
    KS1: gl.constexpr = 1.0 / VB1                    # plane 1's key operand scale
    PER: gl.constexpr = 8 // BITS
    WORDS: gl.constexpr = W // 4
    LOG2E_C: gl.constexpr = 1.4426950408889634
    bh = gl.program_id(0)
    c = gl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    start = (c * per + gl.minimum(c, extra)) * BN
    stop = gl.minimum(start + (per + (c < extra).to(gl.int32)) * BN, P)
    if GDC_NEXT:
        gdc_launch_dependents()

    # queries, transposed: rows = key labels, columns = heads of this KV head, plane by plane
    k_lab = gl.arange(0, W, layout=gl.SliceLayout(1, QL))
    heads_q = gl.arange(0, HEADS, layout=gl.SliceLayout(0, QL))
    q_col = Q + b * s_qb + (hk * n_heads_per_kv + heads_q)[None, :] * s_qh
    q_ok = (heads_q < n_heads_per_kv)[None, :]

    # the queries stay in shared memory (16-bit, by label) and are read back once per key
    # group, instead of living in fp32 registers through the loop (session 15: 1.02-1.07x,
    # with the runtime tile loop below); the first tile's barrier orders these stores before
    # the loads
    q_buf = gl.allocate_shared_memory(QT, [PER, W, HEADS], gl.SwizzledSharedLayout(1, 1, 1,
                                                                                  [1, 0]))
    # fp16 operands (F16) whatever the queries' dtype: each head's queries are scaled by
    # f = 0.99 / max |q| (qf = qscale * f), so that q * s fits fp16 for every key scale s (the
    # cache stores them in fp16); the head's scores come out times f and are scaled back by
    # inv = 1 / f inside the max and the exponent (one FFMA per score instead of one FADD)
    qmax = gl.zeros([HEADS], gl.float32, layout=gl.SliceLayout(0, QL))
    for j in gl.static_range(PER):
        qj = _queries(q_col, q_ok, k_lab, j, W)
        q_buf.index(j).store(qj)
        if F16:
            qmax = gl.maximum(qmax, gl.max(gl.abs(qj.to(gl.float32)), axis=0))
    if F16:
        qf = qscale * gl.where(qmax > 0, 0.99 / qmax, 1.0)
        inv = gl.convert_layout(gl.where(qmax > 0, qmax * (1.0 / 0.99), 1.0),
                                gl.SliceLayout(0, MMA))
    else:
        qf = gl.full([HEADS], qscale, gl.float32, layout=gl.SliceLayout(0, QL))

    # the ring: NS stages of a tile's code words, positions and value scales/middles, and the
    # key scales/middles of the group a stage's tile opens
    # (a buffer's layout is that of one stage: plain rows, the value words as VSMEM)
    FLAT2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    FLAT: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    k_buf = gl.allocate_shared_memory(gl.int32, [NS, BN, WORDS], FLAT2)
    v_buf = gl.allocate_shared_memory(gl.int32, [NS, BN, WORDS], VSMEM)
    pos_buf = gl.allocate_shared_memory(gl.int32, [NS, BN], FLAT)
    vs_buf = gl.allocate_shared_memory(gl.int32, [NS, BN // 2], FLAT)
    vm_buf = gl.allocate_shared_memory(gl.int32, [NS, BN // 2], FLAT)
    ks_buf = gl.allocate_shared_memory(gl.int32, [NS, D // 2], FLAT)
    km_buf = gl.allocate_shared_memory(gl.int32, [NS, D // 2], FLAT)
    # copy sources: key words as the KEY layout reads them (16 contiguous bytes per thread),
    # value words as VCOPY, the small rows one word per lane
    k_slot = gl.arange(0, BN, layout=gl.SliceLayout(1, KEY))
    k_word = gl.arange(0, WORDS, layout=gl.SliceLayout(0, KEY))
    k_src = KD + b * s_kb + hk * s_kh + k_slot[:, None] * WORDS + k_word[None, :]
    vc_slot = gl.arange(0, BN, layout=gl.SliceLayout(1, VCOPY))
    vc_word = gl.arange(0, WORDS, layout=gl.SliceLayout(0, VCOPY))
    v_src = VD + b * s_vb + hk * s_vh + vc_slot[:, None] * WORDS + vc_word[None, :]
    j_slot = gl.arange(0, BN, layout=LANES)
    j_pair = gl.arange(0, BN // 2, layout=LANES)
    j_ch = gl.arange(0, D // 2, layout=LANES)
    pos_src = POS + b * s_pb + j_slot
    vs_src = VS + b * s_vsb + hk * s_vsh + j_pair
    vm_src = VM + b * s_vsb + hk * s_vsh + j_pair
    ks_src = KS + b * s_ksb + hk * s_ksh + j_ch
    km_src = KM + b * s_ksb + hk * s_ksh + j_ch
    for i0 in gl.static_range(NS - 1):
        _issue(i0, start, stop, k_buf, v_buf, pos_buf, vs_buf, vm_buf, ks_buf, km_buf,
               k_src, v_src, k_slot, vc_slot, pos_src, j_slot, vs_src, vm_src, j_pair, ks_src,
               km_src, j_ch, s_ksg, BN, GROUP, NS, WORDS, i0 == 0)

    slot = gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))   # rows of the score tile
    m_i = gl.full([HEADS], float("-inf"), gl.float32, layout=gl.SliceLayout(0, MMA))
    # running sums per head of p (l) and of p * middle - MAGIC_C * p * s (r): per slot of the
    # tile when SUM_LATE (summed over the slots after the loop), else summed every tile
    if SUM_LATE:
        l_i = gl.zeros([BN, HEADS], gl.float32, layout=MMA)
        r_i = gl.zeros([BN, HEADS], gl.float32, layout=MMA)
    else:
        l_i = gl.zeros([HEADS], gl.float32, layout=gl.SliceLayout(0, MMA))
        r_i = gl.zeros([HEADS], gl.float32, layout=gl.SliceLayout(0, MMA))
    # sum(p * s) per head when some DMj != 0, always per slot (a reduction across lanes per
    # tile costs more than the tile's 8 multiply-adds)
    w_acc = gl.zeros([BN, HEADS], gl.float32, layout=MMA)
    PLANE_OFFSETS: gl.constexpr = (DM1 != 0) | (DM2 != 0) | (DM3 != 0)
    acc0 = gl.zeros([W, HEADS], gl.float32, layout=MMA)
    acc1 = gl.zeros([W, HEADS], gl.float32, layout=MMA)
    acc2 = gl.zeros([W, HEADS], gl.float32, layout=MMA)
    acc3 = gl.zeros([W, HEADS], gl.float32, layout=MMA)
    zero = gl.zeros([W, HEADS], gl.float32, layout=MMA)
    z = gl.zeros([HEADS], gl.float32, layout=gl.SliceLayout(0, MMA))
    qs0 = gl.zeros([W, HEADS], DT, layout=QB)
    qs1 = qs0
    qs2 = qs0
    qs3 = qs0

    # the chunk's tiles (it may start and end inside a key group); a runtime loop, with each
    # key group's setup under a branch: a quarter of the code of an unrolled one
    for i in range((stop - start + BN - 1) // BN):
        n0 = start + i * BN
        st = i % NS
        async_copy.wait_group(NS - 2)     # tile i has landed (this thread's copies) ..
        gl.thread_barrier()               # .. every thread's; stage (i - 1) % NS is free
        _issue(i + NS - 1, start, stop, k_buf, v_buf, pos_buf, vs_buf, vm_buf, ks_buf,
               km_buf, k_src, v_src, k_slot, vc_slot, pos_src, j_slot, vs_src, vm_src, j_pair,
               ks_src, km_src, j_ch, s_ksg, BN, GROUP, NS, WORDS)
        # the B operands and column terms of a key group (its first tile in the chunk)
        if ((n0 % GROUP) == 0) | (i == 0):
            q0 = q_buf.index(0).load(QL).to(gl.float32) * qf[None, :]
            ksv = ks_buf.index(st)._reinterpret(gl.float16, [D], FLAT)
            kmv = km_buf.index(st)._reinterpret(gl.float16, [D], FLAT)
            qs0, z = _group_queries(q0, ksv.slice(0, W), kmv.slice(0, W), W, MAGIC_C, DT,
                                    QL, QB, GL)
            if PER > 1:
                q1 = q_buf.index(1).load(QL).to(gl.float32) * qf[None, :]
                qs1, z1 = _group_queries(q1, ksv.slice(W, W), kmv.slice(W, W), W,
                                         MAGIC_C - DM1, DT, QL, QB, GL, KS1)
                z += z1
            if PER > 2:
                q2 = q_buf.index(2).load(QL).to(gl.float32) * qf[None, :]
                q3 = q_buf.index(3).load(QL).to(gl.float32) * qf[None, :]
                qs2, z2 = _group_queries(q2, ksv.slice(2 * W, W), kmv.slice(2 * W, W), W,
                                         MAGIC_C - DM2, DT, QL, QB, GL)
                qs3, z3 = _group_queries(q3, ksv.slice(3 * W, W), kmv.slice(3 * W, W), W,
                                         MAGIC_C - DM3, DT, QL, QB, GL)
                z += z2 + z3
            z = gl.convert_layout(z, gl.SliceLayout(0, MMA))
        pos = pos_buf.index(st).load(gl.SliceLayout(1, MMA))
        live = n0 + slot < stop
        bias = gl.zeros([BN], gl.float32, layout=gl.SliceLayout(1, MMA))
        if HAS_BIAS:
            bias = gl.load(BIAS + b * s_bb + pos, mask=live & (pos >= 0),
                           other=0.0) * LOG2E_C
        kx = k_buf.index(st).load(KEY)
        # scores S^T in log2 units: the planes' (offset + code) . qs, plus the column terms
        s = gl.zeros([BN, HEADS], gl.float32, layout=MMA) + z[None, :]
        if PER == 2:
            k00, k01, k02, k03, k10, k11, k12, k13 = _unpack(kx, KASM, PER, qs0)
            s = mma_v2(_key_operand(_bytes(k00, k01, k02, k03, W), W, KA), qs0, s)
            s = mma_v2(_key_operand(_bytes(k10, k11, k12, k13, W), W, KA), qs1, s)
        else:
            (k00, k01, k02, k03, k10, k11, k12, k13,
             k20, k21, k22, k23, k30, k31, k32, k33) = _unpack(kx, KASM, PER, qs0)
            s = mma_v2(_key_operand(_bytes(k00, k01, k02, k03, W), W, KA), qs0, s)
            s = mma_v2(_key_operand(_bytes(k10, k11, k12, k13, W), W, KA), qs1, s)
            s = mma_v2(_key_operand(_bytes(k20, k21, k22, k23, W), W, KA), qs2, s)
            s = mma_v2(_key_operand(_bytes(k30, k31, k32, k33, W), W, KA), qs3, s)
        ok = live & (pos >= 0)
        if HAS_BIAS:
            if F16:
                s += bias[:, None] / inv[None, :]
            else:
                s += bias[:, None]
        s = gl.where(ok[:, None], s, float("-inf"))
        if F16:
            m_new = gl.maximum(m_i, gl.max(s, axis=0) * inv)
        else:
            m_new = gl.maximum(m_i, gl.max(s, axis=0))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        if F16:
            p = gl.exp2(s * inv[None, :] - m_safe[None, :])
        else:
            p = gl.exp2(s - m_safe[None, :])
        alpha = gl.exp2(m_i - m_safe)
        vsc = vs_buf.index(st)._reinterpret(gl.float16, [BN], FLAT).load(
            gl.SliceLayout(1, MMA))
        vmd = vm_buf.index(st)._reinterpret(gl.float16, [BN], FLAT).load(
            gl.SliceLayout(1, MMA))
        pw = (p * vsc.to(gl.float32)[:, None]).to(DT)
        if SUM_LATE:
            l_i = l_i * alpha[None, :] + p
        else:
            l_i = l_i * alpha + gl.sum(p, axis=0)
        v0i = zero   # where each plane's tile MMA starts
        v1i = zero
        if F16:
            # the value offsets and middles enter each tile's MMAs, so that the accumulators
            # hold the output itself: plane j's codes come as VBASE + b_j * c (b_0 = 1,
            # b_1 = VB1), its MMA starts from b_j * sum(p * mid) - (VBASE + b_j * MID) *
            # sum(p * s) (the offset cancels inside one tile's sum, never against a long
            # running sum: session 24's long-chunk test failed with it left in)
            sa = gl.sum(p * vmd.to(gl.float32)[:, None], axis=0)
            sb = gl.sum(pw.to(gl.float32), axis=0)
            v0i = zero + (sa - (VBASE + MID) * sb)[None, :]
            v1i = zero + (VB1 * sa - (VBASE + VB1 * MID) * sb)[None, :]
        else:
            r_tile = p * vmd.to(gl.float32)[:, None] - MAGIC_C * pw.to(gl.float32)
            if SUM_LATE:
                r_i = r_i * alpha[None, :] + r_tile
            else:
                r_i = r_i * alpha + gl.sum(r_tile, axis=0)
            if PLANE_OFFSETS:
                w_acc = w_acc * alpha[None, :] + pw.to(gl.float32)
        m_i = m_new
        pt = _transposed_probabilities(pw, PB)
        # each tile's p @ v starts from zero in the tensor cores and is added to the
        # running accumulators in fp32: accumulating across tiles inside the MMA lost up to
        # 30% of the output over long chunks, where offset * sum(p * s) cancels against the
        # row terms (BENCHMARKS.md, issue 3, session 10)
        a_col = alpha[None, :]
        vx = v_buf.index(st).load(VALUE)
        if PER == 2:
            v00, v01, v02, v03, v10, v11, v12, v13 = _unpack(vx, VASM, PER, pw)
            acc0 = acc0 * a_col + mma_v2(
                _value_operand(_bytes(v00, v01, v02, v03, W), W, VA), pt, v0i)
            acc1 = acc1 * a_col + mma_v2(
                _value_operand(_bytes(v10, v11, v12, v13, W), W, VA), pt, v1i)
        else:
            (v00, v01, v02, v03, v10, v11, v12, v13,
             v20, v21, v22, v23, v30, v31, v32, v33) = _unpack(vx, VASM, PER, pw)
            acc0 = acc0 * a_col + mma_v2(
                _value_operand(_bytes(v00, v01, v02, v03, W), W, VA), pt, zero)
            acc1 = acc1 * a_col + mma_v2(
                _value_operand(_bytes(v10, v11, v12, v13, W), W, VA), pt, zero)
            acc2 = acc2 * a_col + mma_v2(
                _value_operand(_bytes(v20, v21, v22, v23, W), W, VA), pt, zero)
            acc3 = acc3 * a_col + mma_v2(
                _value_operand(_bytes(v30, v31, v32, v33, W), W, VA), pt, zero)
    async_copy.wait_group(0)

    if SUM_LATE:
        l_i = gl.sum(l_i, axis=0)
        r_i = gl.sum(r_i, axis=0)
    heads = gl.arange(0, HEADS, layout=gl.SliceLayout(0, MMA))
    h_ok = heads < n_heads_per_kv
    idx = (bh * QROWS + heads) * n_chunks_total + chunk_offset + c
    gl.store(M_OUT + idx, m_i * 0.6931471805599453, mask=h_ok)
    gl.store(L_OUT + idx, l_i, mask=h_ok)
    ch = _value_byte(gl.arange(0, W, layout=gl.SliceLayout(1, MMA)), W)
    out = ACC_OUT + idx[None, :] * D + ch[:, None]
    h_ok = h_ok[None, :]
    if F16:
        gl.store(out, acc0, mask=h_ok)
        gl.store(out + W, acc1 * (1.0 / VB1), mask=h_ok)
    else:
        r_col = r_i[None, :]
        w_col = gl.sum(w_acc, axis=0)[None, :]
        gl.store(out, acc0 + r_col, mask=h_ok)
        if PER > 1:
            gl.store(out + W, acc1 + (r_col + DM1 * w_col), mask=h_ok)
        if PER > 2:
            gl.store(out + 2 * W, acc2 + (r_col + DM2 * w_col), mask=h_ok)
            gl.store(out + 3 * W, acc3 + (r_col + DM3 * w_col), mask=h_ok)
    if GDC_WAIT:   # this grid completes after the one it was launched behind
        gdc_wait()
