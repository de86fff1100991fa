"""Throwaway (session 14): the Gluon 4-bit partial kernel alone (4/2 cache, 128K) at several
programs per SM: CUDA-graph time, and with --ncu P one profiled call at P programs per SM.
Run from the repository root."""
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import decode_attention as bench  # noqa: E402
from zipvl_compile.runtime import gluon_decode as gd, triton_decode as td  # noqa: E402

BITS = {"4"}
_launch = gd.launch
gd.launch = lambda q, seg, *a, **k: _launch(q, seg, *a, **k) if str(seg.bits) in BITS else None


class Off:
    def __getitem__(self, grid):
        return lambda *a, **k: None


td._partials = td._merge = Off()
H, HKV, D = 28, 4, 128
gen = torch.Generator(device="cuda").manual_seed(0)
ncu = "--ncu" in sys.argv
batches = [8] if ncu else [1, 8]
for B in batches:
    n = 131072
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    cache = bench.mixed_cache(k, v, 4, 2, gen)
    del k, v
    call = lambda: torch.ops.zipvl.decode_attention(q, None, D ** -0.5, *cache)  # noqa: E731
    if ncu:
        bits, cap, ns, per_sm = sys.argv[sys.argv.index("--ncu") + 1].split(",")
        BITS.clear()
        BITS.add(bits)
        td.GLUON_PROGRAMS_PER_SM, td.GLUON_MAXNREG, gd.STAGES = int(per_sm), int(cap), int(ns)
        call()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        call()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        break
    if "--sweep2" in sys.argv:   # register cap and ring depth, so that 12 programs fit
        configs = [("4", 0, 4, 8), ("4", 168, 4, 8), ("4", 168, 3, 8), ("4", 168, 3, 12),
                   ("4", 160, 3, 12), ("4", 168, 2, 12), ("2", 0, 4, 8), ("2", 0, 4, 12),
                   ("2", 0, 3, 12), ("2", 160, 3, 12), ("2", 128, 3, 16), ("4", 128, 3, 16)]
    else:
        configs = [(bits, 0, 4, p) for bits in ("4", "2") for p in (4, 6, 8, 10, 11, 12, 16)]
    for bits, cap, ns, per_sm in configs:
        BITS.clear()
        BITS.add(bits)
        td.GLUON_PROGRAMS_PER_SM, td.GLUON_MAXNREG, gd.STAGES = per_sm, cap, ns
        t = bench.gpu_time(call)
        print(f"batch {B} bits {bits} maxnreg {cap:3d} stages {ns} programs/SM {per_sm:3d}  "
              f"{t * 1e6:7.1f} us", flush=True)
    BITS.clear()
    BITS.add("4")
    del cache
