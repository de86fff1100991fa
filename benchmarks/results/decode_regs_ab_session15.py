"""Throwaway (session 15): one decode call (zipvl::decode_attention, CUDA graphs) under kernel
and launch settings measured side by side in one process: session 14's Gluon kernel
(``gluon_decode_s14.py.txt``, its source at 44f855c) against a variant that keeps the queries
in shared memory between key groups (``gluon_decode_qsmem_session15.py.txt``: fewer
registers), with tiles of 32 or 64 slots, register caps and programs per SM per code width.
It ran on a working tree whose ``triton_decode.GLUON_PROGRAMS_PER_SM`` could be a dict per
code width (not kept: the committed one takes an int only, so the dict configs no longer run).  Best of
two interleaved rounds.  Prints the registers and spills of every compiled Gluon kernel.
Run from the repository root."""
import importlib.machinery
import importlib.util
import itertools
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import decode_attention as bench  # noqa: E402
from zipvl_compile.runtime import triton_decode as td  # noqa: E402



def _load(name, path):
    """A copy of the Gluon kernel module from a source file (inside the package, so that its
    relative imports resolve)."""
    loader = importlib.machinery.SourceFileLoader(f"zipvl_compile.runtime.{name}", path)
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    sys.modules[loader.name] = mod
    loader.exec_module(mod)
    return mod


old = _load("gluon_s14", "benchmarks/results/gluon_decode_s14.py.txt")
new = _load("gluon_qsmem", "benchmarks/results/gluon_decode_qsmem_session15.py.txt")

S14 = {4: 168, 2: 0}
CAP = {4: 168, 2: 168}
CONFIGS = {  # name: (module, tile, register caps, programs per SM)
    "s14": (old, 32, S14, 12),
    "q smem": (new, 32, S14, 12),
    "q smem, BN 64, 10/12": (new, 64, CAP, {4: 10, 2: 12}),
    "q smem, BN 64, 9/12": (new, 64, CAP, {4: 9, 2: 12}),
    "q smem, BN 64, 8/12": (new, 64, CAP, {4: 8, 2: 12}),
    "q smem, BN 64, 10/10": (new, 64, CAP, {4: 10, 2: 10}),
    "q smem, BN 64, 10/12, 2-bit free": (new, 64, S14, {4: 10, 2: 12}),
}


def use(name):
    mod, tile, caps, per_sm = CONFIGS[name]
    mod.TILE = tile
    mod.MAX_REGISTERS = caps
    td._GLUON = mod
    td.GLUON_PROGRAMS_PER_SM = per_sm


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
    base = outs["s14"]
    for name in CONFIGS:
        diff = ((outs[name] - base).norm() / base.norm()).item()
        rows.append((B, n, bits, name, best[name] * 1e6, best["s14"] / best[name], diff))
        print(rows[-1], flush=True)
    del cache
    torch.cuda.empty_cache()
for label, mod in (("s14", old), ("new", new)):
    for dev, entry in mod._partials.device_caches.items():
        for key, kern in entry[0].items():
            print(f"{label}: regs {kern.n_regs} spills {kern.n_spills} shared "
                  f"{kern.metadata.shared} maxnreg {getattr(kern.metadata, 'maxnreg', None)}")
print(f"{'batch':>5} {'context':>8} {'bits':>5} {'settings':>32} {'graph us':>9} "
      f"{'vs s14':>7} {'rel diff':>9}")
for B, n, bits, name, us, sp, diff in rows:
    print(f"{B:5d} {n:8d} {bits:>5} {name:>32} {us:9.1f} {sp:6.3f}x {diff:9.2e}")
