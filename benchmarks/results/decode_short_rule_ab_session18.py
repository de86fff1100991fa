"""Throwaway (session 18): one decode call (zipvl::decode_attention, CUDA graphs) with the
Gluon segments' programs per SM by code width (``GLUON_PROGRAMS_PER_SM``, the committed rule)
against the short-chunk rule (``triton_decode.GLUON_SHORT_CHUNK_SLOTS``: when the per-width
rule leaves chunks shorter than the threshold, the Gluon segments share
``GLUON_SHORT_PROGRAMS_PER_SM`` programs per SM by slots).  Best of three interleaved rounds;
``diff``: relative difference of the output against the committed rule (a different chunking
changes the fp32 summation order).  Run from the repository root."""
import itertools
import sys

import torch

sys.path.insert(0, "benchmarks")
import decode_attention as bench  # noqa: E402
from zipvl_compile.runtime import triton_decode as td  # noqa: E402

CONFIGS = {"per width": (0, 8), "short<384, 8/SM": (384, 8), "short<512, 8/SM": (512, 8),
           "short<384, 6/SM": (384, 6)}


def use(name):
    td.GLUON_SHORT_CHUNK_SLOTS, td.GLUON_SHORT_PROGRAMS_PER_SM = CONFIGS[name]


H, HKV, D = 28, 4, 128
gen = torch.Generator(device="cuda").manual_seed(0)
rows = []
for (B, n), bits in itertools.product(((1, 32768), (1, 65536), (1, 131072), (2, 65536),
                                       (2, 131072), (4, 131072), (8, 32768), (8, 131072)),
                                      ("4/2", "4/0")):
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    hb, lb = map(int, bits.split("/"))
    cache = bench.mixed_cache(k, v, hb, lb, gen)
    del k, v

    def call(cache=cache, q=q):
        return torch.ops.zipvl.decode_attention(q, None, D ** -0.5, *cache)

    best, outs = {}, {}
    for _ in range(3):
        for name in CONFIGS:
            use(name)
            t = bench.gpu_time(call)
            best[name] = min(best.get(name, 1e9), t)
            outs[name] = call().float()
    base = outs["per width"]
    for name in CONFIGS:
        diff = ((outs[name] - base).norm() / base.norm()).item()
        rows.append((B, n, bits, name, best[name] * 1e6, best["per width"] / best[name], diff))
    del cache
    torch.cuda.empty_cache()
use("per width")
print(f"{'batch':>5} {'context':>7} {'bits':>4}  {'launch':<16} {'us':>7} {'vs per width':>12} "
      f"{'diff':>8}")
for B, n, bits, name, us, ratio, diff in rows:
    print(f"{B:>5} {n:>7} {bits:>4}  {name:<16} {us:7.1f} {ratio:11.3f}x {diff:8.2e}")
