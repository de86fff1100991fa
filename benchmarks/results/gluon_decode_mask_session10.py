import sys, torch
sys.path.insert(0, "."); sys.path.insert(0, "benchmarks")
import decode_attention as bench
from zipvl_compile.runtime import triton_decode as td
D = 128
gen = torch.Generator(device="cuda").manual_seed(0)
out = []
for B in (1, 8):
    n = 131072
    q = torch.randn(B, 28, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, 4, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    cache = bench.mixed_cache(k, v, 4, 2, gen)
    mask = torch.ones(B, 1, 1, n, dtype=torch.bool, device="cuda")
    for name, m in (("no mask", None), ("bool mask", mask)):
        for use in (True, False):
            td.USE_GLUON = use
            t = bench.gpu_time(lambda: torch.ops.zipvl.decode_attention(q, m, D ** -0.5, *cache))
            out.append(f"B{B} 4/2 {name} gluon={use} {t*1e6:.1f} us")
    del k, v, cache; torch.cuda.empty_cache()
print("\n".join(out))
