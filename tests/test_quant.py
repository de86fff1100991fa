"""KV quantization primitive (groundwork of the mixed-precision cache): error bounds, packing,
storage accounting."""
import pytest
import torch

from zipvl_compile.runtime import quant


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_is_exact(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8)
    packed = quant.pack(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack(packed, bits), codes)
    # planar layout (what the Triton decode kernel reads): byte i, bits [j*bits, (j+1)*bits)
    # hold channel j * w + i
    w = 64 * bits // 8
    for j in range(8 // bits):
        plane = (packed >> (j * bits)) & ((1 << bits) - 1)
        assert torch.equal(plane, codes[..., j * w:(j + 1) * w])


def per_element(param, shape, group_size, per_channel):
    """Expand a group parameter [..., T//g, d] or [..., T, d//g] to the element shape."""
    dim = -2 if per_channel else -1
    return param.float().repeat_interleave(group_size, dim=dim).reshape(shape)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roundtrip_error_within_half_a_step(bits, per_channel, dtype):
    x = (torch.randn(2, 4, 96, 64) * torch.rand(64) * 3).to(dtype)  # channels of mixed range
    q = quant.quantize(x, bits, group_size=32, per_channel=per_channel)
    out = quant.dequantize(q)
    assert out.dtype == dtype and out.shape == x.shape
    step = per_element(q.scale, x.shape, 32, per_channel)
    mid = per_element(q.mid, x.shape, 32, per_channel)
    # half a quantization step, plus rounding of the fp16 middle, of the output dtype and of a
    # subnormal fp16 scale (absolute spacing 2**-24) times half the code range
    rounding = 1e-3 * mid.abs() + (8e-3 if dtype == torch.bfloat16 else 1e-6) * out.float().abs()
    rounding += (1 << bits) * 2.0 ** -25
    assert ((out.float() - x.float()).abs() <= 0.5 * step * 1.001 + rounding + 1e-6).all()


def test_groups_store_the_value_of_the_middle_code():
    """A group spanning [-1, 3] at 2 bits: scale 4/3, mid 1 (the value of code 1.5, which the
    decode kernel's error depends on, triton_decode), codes 0 and 3 at the ends; a constant
    group has scale 0 and dequantizes exactly."""
    x = torch.tensor([-1.0, 3.0, 0.4, 1.7]).view(1, 4, 1).expand(1, 4, 4).contiguous()
    q = quant.quantize(x, 2, group_size=4, per_channel=True)
    assert torch.allclose(q.scale.float(), torch.full((1, 1, 4), 4 / 3), rtol=1e-3)
    assert torch.allclose(q.mid.float(), torch.ones(1, 1, 4), atol=1e-3)
    assert quant.unpack(q.data, 2)[0, :, 0].tolist() == [0, 3, 1, 2]
    flat = torch.full((1, 4, 8), 0.3)
    qf = quant.quantize(flat, 4, group_size=4, per_channel=True)
    assert (qf.scale == 0).all() and torch.equal(quant.dequantize(qf), flat.half().float())


def test_per_channel_keys_contain_outlier_channels():
    k = torch.randn(1, 2, 128, 64)
    k[..., 7] *= 50  # an outlier channel, as real keys have
    per_channel = quant.quantize(k, 2, 32, per_channel=True)
    per_token = quant.quantize(k, 2, 32, per_channel=False)
    normal = [c for c in range(64) if c != 7]
    err_c = (quant.dequantize(per_channel) - k)[..., normal].abs().mean()
    err_t = (quant.dequantize(per_token) - k)[..., normal].abs().mean()
    assert err_c < 0.5 * err_t


def test_storage_accounting_and_sixteen_bits():
    x = torch.randn(1, 4, 256, 128, dtype=torch.bfloat16)
    q4 = quant.quantize(x, 4, 64, per_channel=True)
    assert q4.nbytes() == x.numel() // 2 + 2 * (x.numel() // 64) * 2  # codes + fp16 scale/low
    assert q4.nbytes() < 0.3 * x.numel() * 2
    q16 = quant.quantize(x, 16, 64, per_channel=True)
    assert q16.data is x and q16.nbytes() == x.numel() * 2


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="bits"):
        quant.quantize(torch.randn(4, 8), 3, 4, per_channel=True)
    with pytest.raises(ValueError, match="group_size 32 must divide the number of tokens"):
        quant.quantize(torch.randn(40, 8), 4, 32, per_channel=True)


@pytest.mark.parametrize("bits", [2, 4])
def test_float_magic_turns_codes_into_floats_by_bit_or(bits):
    """What the Triton decode kernel relies on: the bits ``pattern | code`` read as bf16 are
    exactly ``magic + code`` for every code."""
    pattern, magic = quant.float_magic(torch.bfloat16, bits)
    codes = torch.arange(1 << bits, dtype=torch.int16)
    floats = (codes | pattern).view(torch.bfloat16)
    assert torch.equal(floats.float() - magic, codes.float())
    assert quant.float_magic(torch.bfloat16, 8) == (0, 0.0)  # 128 + 255 is not exact in bf16


def _run_ptx(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    """Executes the straight-line PTX of ``quant.plane_asm`` / ``quant.pairs_asm`` on 32-bit
    input registers (``{"$2": word}``); returns every register after the last instruction."""
    regs = dict(inputs)

    def val(x):
        return regs[x] if x in regs else int(x, 0)

    for ins in asm.strip("{} ").split(";"):
        ins = ins.strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        a = [x.strip() for x in rest.split(",")]
        if op == "and.b32":
            regs[a[0]] = val(a[1]) & val(a[2])
        elif op == "shr.b32":
            regs[a[0]] = val(a[1]) >> val(a[2])
        elif op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "lop3.b32":  # bit i of the LUT index: (a, b, c) -> 4a + 2b + c
            x, y, z, lut = (val(r) for r in a[1:])
            regs[a[0]] = sum(((lut >> (4 * (x >> i & 1) + 2 * (y >> i & 1) + (z >> i & 1))) & 1)
                             << i for i in range(32))
        elif op == "prmt.b32":  # default mode: each selector nibble picks one of 8 bytes
            pool, sel = val(a[1]) | val(a[2]) << 32, val(a[3])
            regs[a[0]] = sum(((pool >> 8 * ((sel >> 4 * i) & 7)) & 0xFF) << 8 * i
                             for i in range(4))
        elif op == "sub.rn.f16x2":
            x, y = (torch.tensor([val(r)], dtype=torch.int64).to(torch.int32).view(torch.float16)
                    for r in a[1:])
            regs[a[0]] = (x - y).view(torch.int32).item() & 0xFFFFFFFF
        else:
            raise AssertionError(f"unexpected instruction {op}")
    return regs


def _halves(regs: dict[str, int], names, dtype) -> list[float]:
    """The 16-bit halves (low, then high) of registers ``names`` as floats of ``dtype``."""
    got = torch.tensor([regs[r] >> s & 0xFFFF for r in names for s in (0, 16)],
                       dtype=torch.int32).to(torch.int16)
    return got.view(dtype).float().tolist()


def _pair_words(seed: int) -> list[int]:
    """Words for the pair-PTX tests: all zeros, all ones, two patterns, 60 random ones."""
    gen = torch.Generator().manual_seed(seed)
    return [0, 0xFFFFFFFF, 0x01234567, 0x89ABCDEF] + \
        torch.randint(0, 2 ** 32, (60,), generator=gen).tolist()


def _run_plane_ptx(asm: str, word: int, dtype) -> list[float]:
    """``quant.plane_asm``'s four 16-bit results ($0's low and high half, then $1's)."""
    return _halves(_run_ptx(asm, {"$2": word}), ("$0", "$1"), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 2])
def test_plane_ptx_turns_four_bytes_into_their_codes(bits, dtype):
    """The decode kernel's inline PTX, emulated: code ``i`` of plane ``j`` comes from byte ``i``
    of the word, as bf16 128 + code (the magic ``float_magic`` names) or as the exact fp16 code;
    nothing for the other widths and dtypes."""
    gen = torch.Generator().manual_seed(0)
    words = [0, 0xFFFFFFFF, 0x01234567] + torch.randint(0, 2 ** 32, (40,), generator=gen).tolist()
    magic = quant.float_magic(dtype, bits)[1]
    for j in range(8 // bits):
        asm = quant.plane_asm(bits, j, dtype)
        for word in words:
            codes = [(word >> 8 * i + j * bits) & ((1 << bits) - 1) for i in range(4)]
            assert _run_plane_ptx(asm, word, dtype) == [magic + c for c in codes], (j, hex(word))
    assert quant.plane_asm(8, 0, dtype) == quant.plane_asm(bits, 0, torch.float32) == ""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 2])
def test_pairs_ptx_turns_two_words_into_plane_offset_plus_code(bits, dtype):
    """The Gluon kernel's inline PTX, emulated: output 4 * j + i holds the code of plane j in
    byte i of the first word (low half) and of the second (high half), each as the float
    ``plane_offsets[j] + code``: every code of every plane, from random and extreme words."""
    per = 8 // bits
    asm = quant.pairs_asm(bits, dtype)
    offsets = quant.plane_offsets(bits, dtype)
    assert len(offsets) == per
    words = _pair_words(1)
    for a, b in zip(words, reversed(words)):
        regs = _run_ptx(asm, {f"${4 * per}": a, f"${4 * per + 1}": b})
        got = _halves(regs, [f"${r}" for r in range(4 * per)], dtype)
        want = [offsets[j] + ((w >> 8 * i + j * bits) & ((1 << bits) - 1))
                for j in range(per) for i in range(4) for w in (a, b)]
        assert got == want, (hex(a), hex(b))


@pytest.mark.parametrize("bits", [4, 2])
def test_fp16_pairs_ptx_leaves_each_code_in_place_under_1024(bits):
    """The PTX into fp16 in place (4 bits: the Gluon kernel's, for either query dtype; 2 bits:
    session 26's variant for fp16 queries, not in the kernel), emulated: output 4 * j + i
    holds the code of plane j in byte i of the first word (low half) and of the second (high
    half) as the fp16 ``1024 + step_j * code`` (steps 1, 16 at 4 bits; 1, 4, 16, 64 at 2
    bits)."""
    per = 8 // bits
    asm = quant.fp16_pairs_asm(bits)
    steps = {4: (1.0, 16.0), 2: (1.0, 4.0, 16.0, 64.0)}[bits]
    assert quant.FP16_BASE == 1024.0 and quant.fp16_steps(bits) == steps
    words = _pair_words(2)
    for a, b in zip(words, reversed(words)):
        got = _halves(_run_ptx(asm, {f"${4 * per}": a, f"${4 * per + 1}": b}),
                      [f"${r}" for r in range(4 * per)], torch.float16)
        want = [1024.0 + steps[j] * ((w >> 8 * i + bits * j) & ((1 << bits) - 1))
                for j in range(per) for i in range(4) for w in (a, b)]
        assert got == want, (hex(a), hex(b))
