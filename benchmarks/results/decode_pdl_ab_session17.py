"""Throwaway (session 17): one decode call (zipvl::decode_attention, CUDA graphs) with the
kernels of a call launched one behind the other (``triton_decode.PDL``: programmatic dependent
launch) against plain launches, and PDL with the Gluon kernels' early trigger left out (the
next kernel then launches once their programs have exited); with ``--more``: PDL with the
residual window always in the merge (not only when the merge grid fits one wave) and PDL
with 8 Gluon programs per SM instead of 12; with ``--sweep``: PDL with 4-12 Gluon programs
per SM (by code width).  Best of three interleaved rounds;
``diff``: relative difference of the output against plain launches (the same arithmetic: 0).
Run from the repository root."""
import itertools
import sys

import torch

sys.path.insert(0, "benchmarks")
import decode_attention as bench  # noqa: E402
from zipvl_compile.runtime import gluon_decode as gd, triton_decode as td  # noqa: E402

launch = gd.launch


def late_trigger(*args, **kwargs):
    *rest, pdl = args
    return launch(*rest, (pdl[0], False), **kwargs)


in_merge = td._in_merge
PER_SM = dict(td.GLUON_PROGRAMS_PER_SM)
CONFIGS = {  # name: (PDL, Gluon launch, residual-window rule, Gluon programs per SM)
    "plain": (False, launch, in_merge, PER_SM),
    "PDL": (True, launch, in_merge, PER_SM),
    "PDL, late trigger": (True, late_trigger, in_merge, PER_SM),
}
if "--more" in sys.argv:
    del CONFIGS["PDL, late trigger"]
    CONFIGS["PDL, window in merge"] = (True, launch, lambda seg, d, one_wave: in_merge(
        seg, d, True), PER_SM)
    CONFIGS["PDL, 8 per SM"] = (True, launch, in_merge, {4: 8, 2: 8})
if "--sweep" in sys.argv:
    del CONFIGS["PDL, late trigger"]
    for per_sm in ({4: 4, 2: 4}, {4: 6, 2: 6}, {4: 8, 2: 8}, {4: 10, 2: 10}, {4: 8, 2: 12},
                   {4: 12, 2: 8}, {4: 6, 2: 8}):
        CONFIGS[f"PDL, {per_sm[4]}/{per_sm[2]} per SM"] = (True, launch, in_merge, per_sm)


def use(name):
    td.PDL, gd.launch, td._in_merge, td.GLUON_PROGRAMS_PER_SM = CONFIGS[name]


H, HKV, D = 28, 4, 128
gen = torch.Generator(device="cuda").manual_seed(0)
rows = []
for (B, n), bits in itertools.product(((1, 32768), (1, 131072), (8, 32768), (8, 131072)),
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
    base = outs["plain"]
    for name in CONFIGS:
        diff = ((outs[name] - base).norm() / base.norm()).item()
        rows.append((B, n, bits, name, best[name] * 1e6, best["plain"] / best[name], diff))
    del cache
    torch.cuda.empty_cache()
use("PDL")
print(f"{'batch':>5} {'context':>7} {'bits':>4}  {'launch':<20} {'us':>7} {'vs plain':>8} "
      f"{'diff':>8}")
for B, n, bits, name, us, ratio, diff in rows:
    print(f"{B:>5} {n:>7} {bits:>4}  {name:<20} {us:7.1f} {ratio:7.3f}x {diff:8.2e}")
