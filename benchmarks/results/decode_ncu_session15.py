"""Throwaway (session 15): one decode call at 128K batch 8 (4/2, bf16) under session 14's Gluon
kernel and launch, then under the variant with the queries in shared memory
(``gluon_decode_qsmem_session15.py.txt``), capped at 128 registers, 16 programs per SM,
between cudaProfilerStart/Stop for ``ncu --profile-from-start off``.
Run from the repository root."""
import importlib.machinery
import importlib.util
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
B, n, H, HKV, D = 8, 131072, 28, 4, 128
gen = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
k = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
cache = bench.mixed_cache(k, torch.randn_like(k), 4, 2, gen)
for mod, caps, per_sm in ((old, {4: 168, 2: 0}, 12), (new, {4: 128, 2: 128}, 16)):
    mod.MAX_REGISTERS = caps
    td._GLUON, td.GLUON_PROGRAMS_PER_SM = mod, per_sm
    torch.ops.zipvl.decode_attention(q, None, D ** -0.5, *cache)   # compile outside the profile
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    torch.ops.zipvl.decode_attention(q, None, D ** -0.5, *cache)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
