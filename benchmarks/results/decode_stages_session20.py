"""Throwaway (session 20): CUDA-graph time of each stage of one decode call (4/2, 4/0) and of
subsets, on the committed kernel with PDL, to see what the ~10 us that every call costs
beyond its tiles (the intercept of time against context) is made of.  Stages: the Gluon
4-bit partials ("4"), the Gluon 2-bit partials ("2"), the merge (which attends the residual
window at batch 1).  Also: a graph of tiny kernels (launch cost per kernel).
Run from the repository root on a GPU."""
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


td._merge = Gate(td._merge, "merge")
H, HKV, D = 28, 4, 128
gen = torch.Generator(device="cuda").manual_seed(0)
rows = []
x = torch.zeros(1, device="cuda")
rows.append((0, 0, "-", "tiny kernel x1", bench.gpu_time(lambda: x.add_(1)) * 1e6))
rows.append((0, 0, "-", "tiny kernel x3", bench.gpu_time(
    lambda: (x.add_(1), x.add_(1), x.add_(1))) * 1e6))
for (B, n), bits in itertools.product(((1, 8192), (1, 32768), (1, 131072), (8, 131072)),
                                      ("4/2", "4/0")):
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    hb, lb = map(int, bits.split("/"))
    cache = bench.mixed_cache(k, v, hb, lb, gen)
    del k, v
    stages = ["4", "2", "merge"] if lb else ["4", "merge"]
    subsets = [[s] for s in stages] + [stages[:-1]] + [stages]
    if lb:
        subsets.append(["4", "merge"])
        subsets.append(["2", "merge"])
    for sub in subsets:
        ON.clear()
        ON.update(sub)
        t = bench.gpu_time(lambda: torch.ops.zipvl.decode_attention(q, None, D ** -0.5, *cache))
        rows.append((B, n, bits, "+".join(sub), t * 1e6))
        print(rows[-1], flush=True)
    del cache
    torch.cuda.empty_cache()
print(f"{'batch':>5} {'context':>7} {'bits':>5} {'stages':>16} {'graph us':>9}")
for B, n, bits, sub, us in rows:
    print(f"{B:5d} {n:7d} {bits:>5} {sub:>16} {us:9.1f}")
