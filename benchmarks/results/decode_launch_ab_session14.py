"""Throwaway (session 14): one decode call (zipvl::decode_attention, CUDA graphs) under launch
settings measured side by side in one process: the residual window in the merge or alone, and
the Gluon kernel's programs per SM, ring stages and register caps.  Best of two interleaved
rounds.  Run from the repository root.  It ran on an intermediate version of the session's
code in which gluon_decode.STAGES was a dict per code width (decode_launch_ab_session14_h200.txt);
the committed code has one STAGES for both widths."""
import itertools
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import decode_attention as bench  # noqa: E402
from zipvl_compile.runtime import gluon_decode as gd, triton_decode as td  # noqa: E402

CONFIGS = {  # name: (residual in merge, programs per SM, stages, register caps)
    "session 13": (False, 8, {4: 4, 2: 4}, {4: 0, 2: 0}),
    "merge": (True, 8, {4: 4, 2: 4}, {4: 0, 2: 0}),
    "new": (True, 12, {4: 2, 2: 3}, {4: 168, 2: 0}),
    "new, 2-bit ring 2": (True, 12, {4: 2, 2: 2}, {4: 168, 2: 0}),
    "new, 2-bit ring 4": (True, 12, {4: 2, 2: 4}, {4: 168, 2: 0}),
    "new, 4-bit ring 3": (True, 12, {4: 3, 2: 3}, {4: 168, 2: 0}),
}


def use(name):
    td.MERGE_RESIDUAL, td.GLUON_PROGRAMS_PER_SM, gd.STAGES, gd.MAX_REGISTERS = CONFIGS[name]


H, HKV, D = 28, 4, 128
gen = torch.Generator(device="cuda").manual_seed(0)
rows = []
for (B, n), bits in itertools.product(((1, 32768), (1, 131072), (8, 131072)), ("4/2", "4/0")):
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    hb, lb = map(int, bits.split("/"))
    cache = bench.mixed_cache(k, v, hb, lb, gen)
    del k, v
    call = lambda: torch.ops.zipvl.decode_attention(q, None, D ** -0.5, *cache)  # noqa: E731
    best, outs = {}, {}
    for _ in range(2):
        for name in CONFIGS:
            use(name)
            t = bench.gpu_time(call)
            best[name] = min(best.get(name, 1e9), t)
            outs[name] = call().float()
    base = outs["session 13"]
    for name in CONFIGS:
        diff = ((outs[name] - base).norm() / base.norm()).item()
        rows.append((B, n, bits, name, best[name] * 1e6, best["session 13"] / best[name], diff))
        print(rows[-1], flush=True)
    del cache
    torch.cuda.empty_cache()
use("new")
print(f"{'batch':>5} {'context':>8} {'bits':>5} {'settings':>20} {'graph us':>9} "
      f"{'vs s13':>7} {'rel diff':>9}")
for B, n, bits, name, us, sp, diff in rows:
    print(f"{B:5d} {n:8d} {bits:>5} {name:>20} {us:9.1f} {sp:6.3f}x {diff:9.2e}")
