"""Throwaway (session 14): session 13's decode launch settings against the committed ones, side
by side in one process, on shapes and dtypes the launch was not tuned on: the LLaVA-7B layer
(32 query heads, 32 KV heads: no GQA) in bf16, and the Qwen2-7B layer in fp16.  Best of two
interleaved rounds of CUDA-graph medians.  Run from the repository root."""
import itertools
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import decode_attention as bench  # noqa: E402
from zipvl_compile.runtime import gluon_decode as gd, triton_decode as td  # noqa: E402

CONFIGS = {"session 13": (False, 8, 4, {4: 0, 2: 0}),
           "committed": (td.MERGE_RESIDUAL, td.GLUON_PROGRAMS_PER_SM, gd.STAGES,
                         dict(gd.MAX_REGISTERS))}


def use(name):
    td.MERGE_RESIDUAL, td.GLUON_PROGRAMS_PER_SM, gd.STAGES, gd.MAX_REGISTERS = CONFIGS[name]


D = 128
gen = torch.Generator(device="cuda").manual_seed(0)
rows = []
cases = [("llava-7b", 32, 32, torch.bfloat16), ("qwen2-7b", 28, 4, torch.float16)]
for (shape, H, HKV, dtype), B, bits in itertools.product(cases, (1, 8), ("4/2", "4/0")):
    n = 131072 if HKV == 4 or B == 1 else 32768
    q = torch.randn(B, H, 1, D, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn_like(k)
    hb, lb = map(int, bits.split("/"))
    cache = bench.mixed_cache(k, v, hb, lb, gen)
    del k, v
    call = lambda: torch.ops.zipvl.decode_attention(q, None, D ** -0.5, *cache)  # noqa: E731
    best, outs = {}, {}
    for _ in range(2):
        for name in CONFIGS:
            use(name)
            best[name] = min(best.get(name, 1e9), bench.gpu_time(call))
            outs[name] = call().float()
    diff = ((outs["committed"] - outs["session 13"]).norm() / outs["session 13"].norm()).item()
    rows.append((shape, str(dtype).split(".")[-1], B, n, bits, best["session 13"] * 1e6,
                 best["committed"] * 1e6, diff))
    print(rows[-1], flush=True)
    del cache
    torch.cuda.empty_cache()
use("committed")
print(f"{'shape':>9} {'dtype':>9} {'batch':>5} {'context':>8} {'bits':>5} {'s13 us':>8} "
      f"{'now us':>8} {'speedup':>8} {'rel diff':>9}")
for shape, dt, B, n, bits, old, new, diff in rows:
    print(f"{shape:>9} {dt:>9} {B:5d} {n:8d} {bits:>5} {old:8.1f} {new:8.1f} {old / new:7.3f}x "
          f"{diff:9.2e}")
