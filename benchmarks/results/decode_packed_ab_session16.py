"""Throwaway (session 16): one decode call (zipvl::decode_attention, CUDA graphs) with the
session-15 Gluon kernel (``gluon_decode_committed_session16.py.txt``, made by
``git show f73b134:runtime/gluon_decode.py``) against the working tree's
(queries' B operands packed as 64-bit values and set up outside the tile loop, queries in
shared memory in fp32, pre-scaled; the group's setup before or after the next tile's copies
are issued; the "issue first" kernel was the working tree's, now
``gluon_decode_packed_issue_first_session16.py.txt``), at 12 programs per SM and with 16 at 2 bits (128 registers).  Best of three interleaved rounds.  Run from the repository root at f73b134."""
import importlib.machinery
import importlib.util
import itertools
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import decode_attention as bench  # noqa: E402
from zipvl_compile.runtime import gluon_decode as new, triton_decode as td  # noqa: E402


def _load(name, path):
    loader = importlib.machinery.SourceFileLoader(f"zipvl_compile.runtime.{name}", path)
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    sys.modules[loader.name] = mod
    loader.exec_module(mod)
    return mod


old = _load("gluon_s15", "benchmarks/results/gluon_decode_committed_session16.py.txt")
setup_first = _load("gluon_sf", "benchmarks/results/gluon_decode_packed_setup_first_session16.py.txt")
S15 = {4: 168, 2: 0}
CONFIGS = {  # name: (module, register caps, programs per SM by bits)
    "session 15": (old, S15, {4: 12, 2: 12}),
    "packed, setup first": (setup_first, S15, {4: 12, 2: 12}),
    "packed, setup first, 2-bit 16/SM": (setup_first, S15, {4: 12, 2: 16}),
    "packed, issue first": (new, S15, {4: 12, 2: 12}),
}


def use(name):
    mod, caps, per_sm = CONFIGS[name]
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
    for _ in range(3):
        for name in CONFIGS:
            use(name)
            t = bench.gpu_time(call)
            best[name] = min(best.get(name, 1e9), t)
            outs[name] = call().float()
    base = outs["session 15"]
    for name in CONFIGS:
        diff = ((outs[name] - base).norm() / base.norm()).item()
        rows.append((B, n, bits, name, best[name] * 1e6, best["session 15"] / best[name], diff))
    del cache
    torch.cuda.empty_cache()
for label, mod in (("session 15", old), ("setup first", setup_first), ("issue first", new)):
    for dev, entry in mod._partials.device_caches.items():
        for key, kern in entry[0].items():
            print(f"{label}: regs {kern.n_regs} spills {kern.n_spills} shared "
                  f"{kern.metadata.shared}")
print(f"{'batch':>5} {'context':>7} {'bits':>4}  {'kernel':<32} {'us':>7} {'vs s15':>7} "
      f"{'diff':>8}")
for B, n, bits, name, us, ratio, diff in rows:
    print(f"{B:>5} {n:>7} {bits:>4}  {name:<32} {us:7.1f} {ratio:6.3f}x {diff:8.2e}")
