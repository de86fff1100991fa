"""Throwaway (session 20): relative error of Gluon-kernel variants against the Triton partial
kernel (fp32 tile math, each tile's product added in fp32) on the same cache, with an outlier
key channel and values off zero, at chunk lengths of 16-64 tiles.  Run from the repo root."""
import sys

import torch

sys.path.insert(0, "benchmarks")
import ab_decode as ab  # noqa: E402
import decode_attention as bench  # noqa: E402
from zipvl_compile.runtime import gluon_decode, triton_decode  # noqa: E402

variants = {"installed": gluon_decode}
for arg in sys.argv[1:]:
    name, path = arg.split("=")
    variants[name] = ab.load_variant(name, path)
gen = torch.Generator(device="cuda").manual_seed(1)
for B, n in ((1, 131072), (8, 131072), (2, 8192)):
    q = torch.randn(B, 28, 1, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, 4, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k[..., 5] += 8
    v = torch.randn_like(k) + 0.5
    for bits in ((4, 2), (4, 0)):
        cache = bench.mixed_cache(k, v, *bits, gen)

        def call():
            return torch.ops.zipvl.decode_attention(q, None, 128 ** -0.5, *cache).float()
        triton_decode.USE_GLUON = False
        ref = call()
        triton_decode.USE_GLUON = True
        errs = []
        for name, module in variants.items():
            triton_decode._GLUON = module
            errs.append(f"{name} {((call() - ref).norm() / ref.norm()).item():.2e}")
        print(B, n, bits, "vs Triton partials:", ", ".join(errs), flush=True)
        triton_decode._GLUON = gluon_decode
