"""Worst relative error of the Triton decode kernel against the fp32 reference, per case of
``tests/test_gpu.py``'s kernel tests, over many random queries (each test run draws one): how
the tests' bounds (``DECODE_TOL``) were pinned.  GPU only.

    python benchmarks/decode_kernel_error.py [queries per case, default 30]

Prints the 15 cases closest to their bound: worst error, the bound, their ratio.
"""
from __future__ import annotations

import sys
import time

import torch

sys.path.insert(0, "tests")
sys.path.insert(0, ".")
from test_gpu import (DECODE_BITS, DECODE_TOL, decode_case, decode_vs_reference,  # noqa: E402
                      rel_err)


def error(args, dtype, batch, heads, seed) -> tuple[float, bool]:
    """(relative error, output finite) of one random query against the fp32 reference."""
    torch.manual_seed(seed)
    q = torch.randn(batch, heads, 1, 128, device="cuda", dtype=dtype)
    out, ref = decode_vs_reference(args, q)
    return rel_err(out, ref), bool(torch.isfinite(out).all())


def main():
    queries = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    cases = [(dtype, hb, lb, batch, group, 28, 4)  # Qwen2-7B heads
             for dtype in (torch.float32, torch.float16, torch.bfloat16)
             for hb, lb in DECODE_BITS for batch, group in ((1, 128), (3, 32))]
    cases += [(dtype, hb, lb, 3, 32, 8, 8)  # no GQA
              for dtype in (torch.float32, torch.bfloat16) for hb, lb in DECODE_BITS]
    start = time.time()
    rows = []
    for case in cases:
        dtype, hb, lb, batch, group, heads, kv_heads = case
        args = decode_case(dtype, hb, lb, batch, group, kv_heads)
        results = [error(args, dtype, batch, heads, seed) for seed in range(queries)]
        worst = max(range(queries), key=lambda s: results[s][0])
        nonfinite = sum(not ok for _, ok in results)
        rows.append((results[worst][0] / DECODE_TOL[dtype], results[worst][0], worst,
                     nonfinite, case))
    rows.sort(key=lambda r: -r[0])
    print(f"{len(cases)} cases x {queries} random queries in {time.time() - start:.0f} s")
    print("err/bound  worst err  bound    query seed  non-finite  case")
    for ratio, worst, seed, nonfinite, c in rows[:15]:
        print(f"{ratio:9.3f}  {worst:9.2e}  {DECODE_TOL[c[0]]:.1e}  {seed:10d}  {nonfinite:10d}  "
              f"{str(c[0])[6:]} {c[1]}/{c[2]} batch {c[3]} group {c[4]} heads {c[5]}/{c[6]}")


if __name__ == "__main__":
    main()
