"""Throwaway (session 14): CUDA-graph time of each stage of one 4/2 (and 4/0) decode call at
128K, and of subsets run back to back, to see what the kernel boundaries cost.
Stages: the Gluon 4-bit partials, the Gluon 2-bit partials, the residual window's Triton
partials, the merge.  Run from the repository root."""
import itertools
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import decode_attention as bench  # noqa: E402
from zipvl_compile.runtime import gluon_decode as gd, triton_decode as td  # noqa: E402

ON = set()
_launch = gd.launch
gd.launch = lambda q, seg, *a, **k: _launch(q, seg, *a, **k) if str(seg.bits) in ON else None


class Gate:
    def __init__(self, kernel, name):
        self.kernel, self.name = kernel, name

    def __getitem__(self, grid):
        return self.kernel[grid] if self.name in ON else (lambda *a, **k: None)


td._partials = Gate(td._partials, "res")
td._merge = Gate(td._merge, "merge")
H, HKV, D = 28, 4, 128
gen = torch.Generator(device="cuda").manual_seed(0)
rows = []
for B, bits in itertools.product((1, 8), ("4/2", "4/0")):
    n = 131072
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    hb, lb = map(int, bits.split("/"))
    cache = bench.mixed_cache(k, v, hb, lb, gen)
    del k, v
    stages = ["4", "2", "res", "merge"] if lb else ["4", "res", "merge"]
    subsets = [[s] for s in stages] + [stages[:2], stages[:-1], stages]
    if lb:
        subsets.append(["4", "2", "merge"])
    for sub in subsets:
        ON.clear()
        ON.update(sub)
        t = bench.gpu_time(lambda: torch.ops.zipvl.decode_attention(q, None, D ** -0.5, *cache))
        rows.append((B, bits, "+".join(sub), t * 1e6))
        print(rows[-1], flush=True)
    del cache
    torch.cuda.empty_cache()
print(f"{'batch':>5} {'bits':>5} {'stages':>20} {'graph us':>9}")
for B, bits, sub, us in rows:
    print(f"{B:5d} {bits:>5} {sub:>20} {us:9.1f}")
