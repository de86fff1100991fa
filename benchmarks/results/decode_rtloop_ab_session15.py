"""Throwaway (session 15): one decode call (zipvl::decode_attention, CUDA graphs) with the
committed Gluon kernel against variants whose key group's tiles run in a runtime loop instead
of a ``static_range`` (a quarter of the code, no spills at 168 registers in an offline sm_90
compile), alone and with the queries in shared memory.  Best of two interleaved rounds.
Run from the repository root."""
import importlib.machinery
import importlib.util
import itertools
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import decode_attention as bench  # noqa: E402
from zipvl_compile.runtime import gluon_decode as committed, triton_decode as td  # noqa: E402



def _load(name, path):
    """A copy of the Gluon kernel module from a source file (inside the package, so that its
    relative imports resolve)."""
    loader = importlib.machinery.SourceFileLoader(f"zipvl_compile.runtime.{name}", path)
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    sys.modules[loader.name] = mod
    loader.exec_module(mod)
    return mod


rt = _load("gluon_rt", "benchmarks/results/gluon_decode_rtloop_session15.py.txt")
rtq = _load("gluon_rtq", "benchmarks/results/gluon_decode_rtloop_qsmem_session15.py.txt")
S14 = {4: 168, 2: 0}
CONFIGS = {  # name: (module, tile, register caps, programs per SM)
    "committed": (committed, 32, S14, 12),
    "runtime loop": (rt, 32, S14, 12),
    "runtime loop, q smem": (rtq, 32, S14, 12),
    "runtime loop, q smem, uncapped": (rtq, 32, {4: 0, 2: 0}, 12),
    "runtime loop, 4-bit uncapped, 10/SM": (rt, 32, {4: 0, 2: 0}, 10),
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
for (B, n), bits in itertools.product(((1, 32768), (1, 131072), (8, 32768), (8, 131072)),
                                     ("4/2", "4/0")):
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
    base = outs["committed"]
    for name in CONFIGS:
        diff = ((outs[name] - base).norm() / base.norm()).item()
        rows.append((B, n, bits, name, best[name] * 1e6, best["committed"] / best[name], diff))
        print(rows[-1], flush=True)
    del cache
    torch.cuda.empty_cache()
for label, mod in (("committed", committed), ("runtime loop", rt), ("rt + q smem", rtq)):
    for dev, entry in mod._partials.device_caches.items():
        for key, kern in entry[0].items():
            print(f"{label}: regs {kern.n_regs} spills {kern.n_spills} shared "
                  f"{kern.metadata.shared} maxnreg {getattr(kern.metadata, 'maxnreg', None)}")
print(f"{'batch':>5} {'context':>8} {'bits':>5} {'settings':>32} {'graph us':>9} "
      f"{'vs comm':>7} {'rel diff':>9}")
for B, n, bits, name, us, sp, diff in rows:
    print(f"{B:5d} {n:8d} {bits:>5} {name:>32} {us:9.1f} {sp:6.3f}x {diff:9.2e}")
