"""Throwaway (session 21): what the merge adds after the partials, and the order of the two
quantized segments.  One zipvl::decode_attention call (CUDA graphs, Qwen2-7B layer, 4/2),
best of 3 interleaved rounds, variants: the committed call ("base"); no merge launched
("nomerge", session 20's 4+2 stage); the merge without its grid-dependency wait ("nowait",
racy: timing only); the merge reading one chunk ("noread", wrong output: timing only); the
2-bit segment's partials launched first ("rev").  Run from the repository root on a GPU."""
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
sys.path.insert(0, "benchmarks/results")
import decode_attention as bench  # noqa: E402
import merge_variants_session21 as mv  # noqa: E402
from zipvl_compile.runtime import triton_decode as td  # noqa: E402

MERGE, DECODE = td._merge, td.decode


class Off:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def rev(q, segs, bias, scale):
    if len(segs) >= 3 and segs[0].bits != 16 and segs[1].bits != 16:
        segs = [segs[1], segs[0], *segs[2:]]
    return DECODE(q, segs, bias, scale)


VARIANTS = {"base": (MERGE, DECODE), "nomerge": (Off(), DECODE), "nowait": (mv.merge_nowait, DECODE),
            "noread": (mv.merge_noread, DECODE), "rev": (MERGE, rev)}
H, HKV, D = 28, 4, 128
gen = torch.Generator(device="cuda").manual_seed(0)
rows = []
for B, n in ((1, 32768), (1, 131072), (8, 131072)):
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    cache = bench.mixed_cache(k, v, 4, 2, gen)
    del k, v
    best, outs = {}, {}
    for _ in range(3):
        for name, (merge, decode) in VARIANTS.items():
            td._merge, td.decode = merge, decode
            best[name] = min(best.get(name, 1e9),
                             bench.gpu_time(lambda: torch.ops.zipvl.decode_attention(
                                 q, None, D ** -0.5, *cache)))
            outs[name] = torch.ops.zipvl.decode_attention(q, None, D ** -0.5, *cache).float()
    td._merge, td.decode = MERGE, DECODE
    for name in VARIANTS:
        d = ((outs[name] - outs["base"]).norm() / outs["base"].norm()).item()
        rows.append((B, n, name, best[name] * 1e6, best["base"] / best[name], d))
        print(rows[-1], flush=True)
    del cache
    torch.cuda.empty_cache()
print(f"{'batch':>5} {'context':>7} {'variant':>8} {'graph us':>9} {'vs base':>8} {'diff':>9}")
for B, n, name, us, r, d in rows:
    print(f"{B:5d} {n:7d} {name:>8} {us:9.1f} {r:7.3f}x {d:9.2e}")
