"""Session 22, throwaway: errors of the decode kernels when a few keys' logits jump by 50-140
(the inputs of tests/test_gpu.py::test_gluon_decode_is_exact_when_a_score_jumps_deep_in_a_chunk).
Per (bits, dtype): logit range, relative error against the fp32 reference of the Gluon path,
of the Triton path (USE_GLUON=False), and of the same inputs without the spikes; the worst
head's error of the Gluon path.  (Session 22's first version also had a dense-SDPA column; it
concatenated the segments without their slot positions, so it was dropped as invalid.)"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import decode_attention as bench  # noqa: E402
from zipvl_compile.runtime import decode_attention as da  # noqa: E402
from zipvl_compile.runtime import triton_decode  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def f32(segs):
    return [da.Segment(s.kd, s.ks, s.km, s.vd, s.vs, s.vm, s.pos, s.bits, s.group, s.vgroup,
                       torch.float32, s.base) for s in segs]


rows = []
for hb, lb in [(4, 2), (4, 0)]:
    for dtype in (torch.float16, torch.bfloat16):
        for spikes in (True, False):
            gen = torch.Generator(device="cuda").manual_seed(21 + hb + lb)
            B, Hkv, n, d = 2, 4, 8192, 128
            q = torch.randn(B, 28, 1, d, device="cuda", dtype=dtype, generator=gen)
            k = torch.randn(B, Hkv, n, d, device="cuda", dtype=dtype, generator=gen)
            v = torch.randn(B, Hkv, n, d, device="cuda", dtype=dtype, generator=gen)
            qg = q.float().view(B, Hkv, 7, d)
            direction = qg.sum(2) / qg.sum(2).norm(dim=-1, keepdim=True)
            per_unit = (qg * direction[:, :, None]).sum(-1).mean(-1) * d ** -0.5
            spike = direction * (100.0 / per_unit)[..., None]
            if spikes:
                k[:, :, [1000, 2900, 5100, 7000]] = spike[:, :, None].to(dtype)
            logits = (qg @ spike[..., None]).squeeze(-1) * d ** -0.5
            args = bench.mixed_cache(k, v, hb, lb, gen)
            segs = da.segments(*args)
            ref = da.reference(q.float(), f32(segs), None, d ** -0.5).float()
            triton_decode.USE_GLUON = True
            out_g = torch.ops.zipvl.decode_attention(q, None, d ** -0.5, *args)
            triton_decode.USE_GLUON = False
            out_t = torch.ops.zipvl.decode_attention(q, None, d ** -0.5, *args)
            triton_decode.USE_GLUON = True
            per_head = ((out_g.float() - ref).norm(dim=-1) / ref.norm(dim=-1)).flatten()
            rows.append((hb, lb, str(dtype)[6:], spikes, logits.min().item(),
                         logits.max().item(), rel(out_g, ref), rel(out_t, ref),
                         torch.isfinite(out_g).all().item(),
                         per_head.max().item()))
print(f"{'bits':>4} {'dtype':>8} {'spk':>3} {'lmin':>6} {'lmax':>6} {'gluon':>8} {'triton':>8} "
      f"{'finite':>6} {'worst head':>10}")
for hb, lb, dt, sp, lo, hi, g, t, fin, worst in rows:
    print(f"{hb}/{lb:<2} {dt:>8} {int(sp):>3} {lo:6.1f} {hi:6.1f} {g:8.2e} {t:8.2e} "
          f"{str(fin):>6} {worst:10.2e}")
