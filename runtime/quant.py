"""Group-wise asymmetric integer quantization of K/V, packed into bytes (building block of the
mixed-precision KV cache, issue 3).

Layout follows KIVI: keys are quantized per channel (a group is ``group_size`` consecutive
tokens of one channel, so outlier channels get their own range), values per token (a group is
``group_size`` consecutive channels of one token).  Codes of ``bits`` in {8, 4, 2} are packed
``8 // bits`` to a byte along the channel dimension in *planes*: with ``w = d * bits // 8`` bytes
per token, byte ``i`` holds channels ``i, i + w, i + 2w, ...`` at bit offsets ``0, bits,
2 * bits, ...``.  A kernel then unpacks plane ``j`` (channels ``j*w .. j*w + w - 1``, contiguous)
with one shift and one mask, no interleaving.  ``bits=16`` stores the tensor unchanged.

Shapes: ``x [..., T, d]``.  Per channel needs ``T % group_size == 0`` (the cache keeps the
remainder in its full-precision residual window); per token needs ``d % group_size == 0``.
Each group stores a float16 ``scale`` and ``mid``, the value of the middle code
``c = (2**bits - 1) / 2``: ``x ~ (code - c) * scale + mid``.  (Storing the middle rather than the
minimum costs nothing and shrinks the error of a kernel that rounds ``q * scale`` to 16 bits
before its dot product with the codes: that rounding is weighed by ``code - c``, at most half
the code range, instead of by ``code``; measured in BENCHMARKS.md, issue 3, session 9.)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

BITS = (16, 8, 4, 2)


@dataclass
class Quantized:
    """Packed codes ``data [..., T, d * bits // 8]`` uint8 (or the raw tensor at 16 bits),
    ``scale``/``mid`` [..., T // g, d] (per channel) or [..., T, d // g] (per token)."""

    data: torch.Tensor
    scale: torch.Tensor | None
    mid: torch.Tensor | None
    bits: int
    group_size: int
    per_channel: bool
    dtype: torch.dtype

    def nbytes(self) -> int:
        """Bytes of device storage this tensor holds (codes, scales, middles)."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.mid)
                   if t is not None)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., d] with values < 2**bits -> [..., d * bits // 8] bytes (planes, see the
    module docstring)."""
    per_byte = 8 // bits
    planes = codes.view(*codes.shape[:-1], per_byte, codes.shape[-1] // per_byte)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)[:, None]
    return (planes << shifts).sum(dim=-2, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: [..., d * bits // 8] bytes -> uint8 codes [..., d]."""
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)[:, None]
    planes = (packed[..., None, :] >> shifts) & ((1 << bits) - 1)
    return planes.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))


def float_magic(dtype: torch.dtype, bits: int) -> tuple[int, float]:
    """(bit pattern, value) of a float ``m`` such that the bits ``pattern | code`` are the float
    ``m + code`` in ``dtype`` for every code of ``bits`` bits: a kernel turns codes into floats
    with one integer OR (no int-to-float conversion) and subtracts ``m`` once per dot product.
    Only bf16 below 8 bits (``m = 128``); (0, 0.0) elsewhere (plain conversion).  fp16 has the
    same trick with ``m = 1024``, but subtracting ``1024 * sum(q * s)`` from a tensor-core fp32
    sum cancels ~700x with 2-bit codes and failed the kernel's fp16 error bound on an H100.
    (The Gluon kernel's 4-bit segments do keep 1024 in, ``fp16_nibble_pairs_asm``, and cancel
    it inside each tile's value MMA instead of against a long running sum.)"""
    if bits < 8 and dtype == torch.bfloat16:
        return 0x4300, 128.0      # bf16 [128, 256) has spacing 1
    return 0, 0.0


@functools.lru_cache(maxsize=None)
def plane_asm(bits: int, j: int, dtype: torch.dtype) -> str:
    """PTX for plane ``j`` of four packed bytes (one 32-bit register, ``$2``) as four 16-bit
    floats (two registers, ``$0`` and ``$1``), or '' where the kernel converts codes with plain
    Triton ops (8 bits, fp32 queries).  A shift and a mask leave the codes in the low bits of
    each byte; two byte permutes put a constant byte above each code: 0x43 makes the bf16
    ``128 + code`` (the kernel subtracts 128 outside its dot products, ``float_magic``),
    0x64 the fp16 ``1024 + code``, from which one subtraction per register (two codes) leaves
    the exact code (subtracting 1024 after an fp16 dot product cancels too much).  Four codes
    in 3-6 instructions."""
    if bits not in (2, 4) or dtype not in (torch.bfloat16, torch.float16):
        return ""
    high = 0x43 if dtype == torch.bfloat16 else 0x64
    assert dtype != torch.bfloat16 or float_magic(dtype, bits)[0] == high << 8
    fill = f"0x{high:02X}{high:02X}{high:02X}{high:02X}"
    mask = "0x" + f"{(1 << bits) - 1:02X}" * 4
    shift = f"shr.b32 t, $2, {j * bits}; and.b32 t, t, {mask};" if j else \
        f"and.b32 t, $2, {mask};"
    exact = ("mov.b32 m, 0x64006400; sub.rn.f16x2 $0, $0, m; sub.rn.f16x2 $1, $1, m; "
             if dtype == torch.float16 else "")
    return (f"{{ .reg .b32 t, m; {shift} prmt.b32 $0, t, {fill}, 0x4140; "
            f"prmt.b32 $1, t, {fill}, 0x4342; {exact}}}")


# bf16 2-bit codes converted in place (``pairs_asm``): the bf16 high byte above each plane's
# bits (plane j at bits 2j, plane 3 shifted to bits 4-5), whose exponent puts spacing 1 there
IN_PLACE_FILLS = (0x4300, 0x4200, 0x4100, 0x4100)


def _in_place(bits: int, dtype: torch.dtype) -> bool:
    return bits == 2 and dtype == torch.bfloat16


def plane_offsets(bits: int, dtype: torch.dtype) -> tuple[float, ...]:
    """Per plane j, the float ``o_j`` such that ``pairs_asm`` turns a code ``c`` of plane j into
    the 16-bit float ``o_j + c``: bf16 2-bit codes, the values of ``IN_PLACE_FILLS`` (128, 32,
    8, 8); otherwise ``float_magic``'s (bf16 128, fp16 codes come out exact: 0)."""
    if _in_place(bits, dtype):
        fills = torch.tensor(IN_PLACE_FILLS, dtype=torch.int16).view(torch.bfloat16)
        return tuple(fills.tolist())
    return (float_magic(dtype, bits)[1],) * (8 // bits)


@functools.lru_cache(maxsize=None)
def pairs_asm(bits: int, dtype: torch.dtype) -> str:
    """PTX of the Gluon decode kernel turning two words of packed code bytes ``a``, ``b``
    (``$N``, ``$N+1``) into 16-bit floats in pairs: output ``4 * j + i`` (plane j, byte i) holds
    the code ``c`` of plane j in byte i of ``a`` (low half) and of ``b`` (high half) as the
    float ``o_j + c`` (``plane_offsets``).  bf16 2-bit codes: one permute per byte i puts byte
    i of ``a`` and of ``b`` at bytes 0 and 2, then per plane one AND-OR (LOP3) leaves the code
    in place under that plane's exponent byte (0x43, 0x42, 0x41; plane 3 after one shift), 24
    instructions per 32 codes.  Otherwise two permutes interleave the words' bytes, then per
    plane and register a shift (after plane 0), a mask and one permute per half put 0x43 (bf16
    ``128 + c``) or 0x64 (fp16 ``1024 + c``, minus 1024 once more) above each code."""
    per = 8 // bits
    if _in_place(bits, dtype):
        return _pairs_asm_in_place(f"${4 * per}", f"${4 * per + 1}")
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


# ``fp16_pairs_asm``: plane j's code c comes out as the fp16 FP16_BASE + fp16_steps(bits)[j] * c
FP16_BASE = 1024.0


def fp16_steps(bits: int) -> tuple[float, ...]:
    """Per plane j of ``bits``-bit codes, the step ``2 ** (bits * j)`` with which
    ``fp16_pairs_asm`` leaves its codes in place: (1, 16) at 4 bits, (1, 4, 16, 64) at 2."""
    return tuple(float(1 << bits * j) for j in range(8 // bits))


@functools.lru_cache(maxsize=None)
def fp16_pairs_asm(bits: int) -> str:
    """``pairs_asm``'s job for 4- or 2-bit codes into fp16, with the codes left in place
    (``_in_place_asm``): plane j's code (bits ``bits * j`` up of each byte) under the fp16
    exponent of 1024, so that output ``4 * j + i`` holds ``FP16_BASE + fp16_steps(bits)[j] * c``
    (fp16 [1024, 2048) has spacing 1, and a byte's 8 bits all sit in the mantissa) for the
    words ``$N``, ``$N+1`` (N = 4 * planes).  Per 32 codes: 24 instructions at 4 bits
    (``pairs_asm`` into bf16: 32) and 20 at 2 bits (``pairs_asm`` into fp16: 49, the bf16
    in-place one: 24).  The Gluon kernel takes the 4-bit one; the 2-bit one, with its value
    offsets inside each tile's MMA, failed an fp16 accuracy test (BENCHMARKS.md, issue 3,
    session 26)."""
    per = 8 // bits
    mask = (1 << bits) - 1
    return _in_place_asm(f"${4 * per}", f"${4 * per + 1}",
                         [(0, mask << bits * j, 0x6400) for j in range(per)])


def _pairs_asm_in_place(a: str, b: str) -> str:
    """``pairs_asm`` of bf16 2-bit codes: output 4 * j + i = bf16 (o_j + code) of plane j,
    byte i, of ``a`` (low half) and ``b`` (high half), under ``IN_PLACE_FILLS``: planes 0-2
    in place, plane 3 (bits 6-7, past bf16's 7-bit mantissa) shifted down by 2 first."""
    planes = [(0, 3 << 2 * j, IN_PLACE_FILLS[j]) for j in range(3)]
    return _in_place_asm(a, b, planes + [(2, 3 << 4, IN_PLACE_FILLS[3])])


def _in_place_asm(a: str, b: str, planes) -> str:
    """PTX turning the 32-bit words ``a``, ``b`` into 16-bit floats without moving the codes:
    per byte i, one permute puts byte i of ``a`` and of ``b`` in the low byte of both halves
    of ``u``; then per plane j, given as (shift, mask, fill), one AND-OR writes output
    ``4 * j + i`` = ``((u >> shift) & mask) | fill`` in both halves (the shift, when not 0,
    one more instruction)."""
    lines = []
    for i in range(4):
        lines.append(f"prmt.b32 u, {a}, {b}, 0x{4 + i:X}{4 + i:X}{i:X}{i:X};")
        for j, (shift, mask, fill) in enumerate(planes):
            src = "u"
            if shift:
                lines.append(f"shr.b32 x, u, {shift};")
                src = "x"
            # (src & mask) | fill: LUT 0xEA over (a, b, c) = (0xF0, 0xCC, 0xAA)
            lines.append(f"lop3.b32 ${4 * j + i}, {src}, 0x{mask * 0x10001:08X}, "
                         f"0x{fill * 0x10001:08X}, 0xEA;")
    regs = "u, x" if any(shift for shift, _, _ in planes) else "u"
    return "{ .reg .b32 " + regs + "; " + " ".join(lines) + " }"


def middle_code(bits: int) -> float:
    """``c = (2**bits - 1) / 2``: the code whose value a group stores as ``mid``."""
    return ((1 << bits) - 1) / 2


def _grouped(x: torch.Tensor, group_size: int, per_channel: bool) -> torch.Tensor:
    """View x [..., T, d] as groups on dim -2: [..., T//g, g, d] or [..., T, d//g, g]."""
    *lead, T, d = x.shape
    if per_channel:
        return x.reshape(*lead, T // group_size, group_size, d)
    return x.reshape(*lead, T, d // group_size, group_size)


def quantize(x: torch.Tensor, bits: int, group_size: int, per_channel: bool) -> Quantized:
    """Quantize x [..., T, d] (see module docstring for the layout and shape rules)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS} (got {bits})")
    T, d = x.shape[-2:]
    if bits == 16:
        return Quantized(x, None, None, 16, group_size, per_channel, x.dtype)
    if (T if per_channel else d) % group_size:
        axis = "tokens" if per_channel else "channels"
        raise ValueError(f"group_size {group_size} must divide the number of {axis} "
                         f"({T if per_channel else d})")
    g = _grouped(x.float(), group_size, per_channel)
    reduce_dim = -2 if per_channel else -1
    top = (1 << bits) - 1
    low = g.amin(dim=reduce_dim, keepdim=True)
    scale = ((g.amax(dim=reduce_dim, keepdim=True) - low) / top).half()
    c = middle_code(bits)
    mid = (low + scale.float() * c).half()
    safe = torch.where(scale > 0, scale, 1.0).float()  # a constant group: every code is c
    codes = torch.round((g - mid.float()) / safe + c).clamp(0, top)
    codes = codes.to(torch.uint8).reshape(x.shape)
    return Quantized(pack(codes, bits), scale.squeeze(reduce_dim), mid.squeeze(reduce_dim),
                     bits, group_size, per_channel, x.dtype)


def dequantize(q: Quantized) -> torch.Tensor:
    """Back to q.dtype: [..., T, d]."""
    if q.bits == 16:
        return q.data
    codes = unpack(q.data, q.bits).float()
    g = _grouped(codes, q.group_size, q.per_channel)
    expand_dim = -2 if q.per_channel else -1
    centred = g - middle_code(q.bits)
    out = centred * q.scale.float().unsqueeze(expand_dim) + q.mid.float().unsqueeze(expand_dim)
    return out.reshape(codes.shape).to(q.dtype)
