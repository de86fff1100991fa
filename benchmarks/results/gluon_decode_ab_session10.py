import sys, torch
sys.path.insert(0, "."); sys.path.insert(0, "benchmarks")
import decode_attention as bench
from zipvl_compile.runtime import triton_decode as td, decode_attention as da
D = 128
gen = torch.Generator(device="cuda").manual_seed(0)
out = []
def prof(f, tag):
    from torch.profiler import profile, ProfilerActivity
    f(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(5): f()
        torch.cuda.synchronize()
    for e in p.key_averages():
        if e.device_time_total > 0:
            out.append(f"   prof {tag} {e.key[:40]:40s} {e.device_time_total/e.count:.1f} us x{e.count}")
for B in (1, 8):
    n = 131072
    q = torch.randn(B, 28, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, 4, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    t_d = min(t for t, _ in bench.dense_baselines(q, k, v).values())
    out.append(f"B{B} dense {t_d*1e6:.1f}")
    for hb, lb in ((4, 2), (4, 0)):
        cache = bench.mixed_cache(k, v, hb, lb, gen)
        f = lambda: torch.ops.zipvl.decode_attention(q, None, D ** -0.5, *cache)
        if lb == 2:
            segs = [da.Segment(s.kd, s.ks, s.km, s.vd, s.vs, s.vm, s.pos, s.bits, s.group, s.vgroup, torch.float32, s.base) for s in da.segments(*cache)]
            ref = da.reference(q.float(), segs, None, D ** -0.5).float()
            for use in (False, True):
                td.USE_GLUON = use
                o = f().float()
                out.append(f"B{B} {hb}/{lb} gluon={use} rel err vs fp32 reference {((o-ref).norm()/ref.norm()).item():.2e}")
            del ref, segs
        td.USE_GLUON = False
        t_old = bench.gpu_time(f)
        out.append(f"B{B} {hb}/{lb} triton {t_old*1e6:.1f} us {t_d/t_old:.2f}x")
        td.USE_GLUON = True
        for reg, pps, bc, bd in ((0, 8, 128, 32), (0, 8, 256, 16), (0, 8, 256, 32), (0, 7, 256, 16)):
            td.GLUON_MAXNREG, td.GLUON_PROGRAMS_PER_SM, td.MERGE_BLOCK_C, td.MERGE_BLOCK_D = reg, pps, bc, bd
            t = bench.gpu_time(f)
            out.append(f"B{B} {hb}/{lb} gluon reg{reg} pps{pps} merge {bc}x{bd} {t*1e6:.1f} us {t_d/t:.2f}x")
        td.GLUON_MAXNREG, td.GLUON_PROGRAMS_PER_SM, td.MERGE_BLOCK_C, td.MERGE_BLOCK_D = 0, 8, 128, 32
        if B == 1: prof(f, f"{hb}/{lb}")
        del cache
    del k, v; torch.cuda.empty_cache()
print("\n".join(out))
