"""A/B of decode-kernel variants in one process: one ``zipvl::decode_attention`` call (CUDA
graphs, Qwen2-7B layer shape) per variant, best of ``--rounds`` interleaved rounds.

A variant is a file with the shape of ``zipvl_compile/runtime/gluon_decode.py`` (the Gluon
kernel of the 2- and 4-bit segments), loaded as a module of ``zipvl_compile.runtime`` and used
in place of the installed one (``NAME=PATH``), the installed module itself (``installed``), or
the installed module or a file with launch settings of ``triton_decode`` changed for that
variant (``NAME:SETTING=VALUE;SETTING=VALUE`` or ``NAME=PATH:SETTING=VALUE``, values as Python
literals).  ``diff``: relative L2 difference of each output against the first variant's (a
different instruction order or chunking changes the fp32 summation order: ~1e-3; a wrong
kernel: ~1).

usage (repository root, on a GPU):
  python benchmarks/ab_decode.py --variant before=old_gluon_decode.py --variant installed \\
      --variant "short6:GLUON_SHORT_PROGRAMS_PER_SM=6" \\
      [--shapes 1x131072,8x131072] [--bits 4/2,4/0] [--rounds 3] [--dtype float16]
"""
from __future__ import annotations

import argparse
import ast
import importlib.machinery
import importlib.util
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_attention as bench  # noqa: E402
from zipvl_compile.runtime import triton_decode  # noqa: E402

H, HKV, D = 28, 4, 128


def load_variant(name: str, path: str):
    """The module in ``path`` as ``zipvl_compile.runtime.ab_<name>`` (its relative imports
    resolve inside the package)."""
    full = f"zipvl_compile.runtime.ab_{name.replace('-', '_')}"
    loader = importlib.machinery.SourceFileLoader(full, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(full, loader))
    sys.modules[full] = module
    loader.exec_module(module)
    return module


def use(module, settings: dict) -> None:
    """Run the Gluon segments on ``module`` with ``settings`` of ``triton_decode`` applied (the
    others at the values they had when the script started)."""
    triton_decode._GLUON = module
    for name, value in {**DEFAULTS, **settings}.items():
        setattr(triton_decode, name, value)


DEFAULTS: dict = {}


def compare(variants: dict, shapes, bit_pairs, rounds: int = 3,
            dtype: torch.dtype = torch.bfloat16) -> list[tuple]:
    """Rows (batch, context, bits, variant, us, speedup vs the first variant, diff);
    ``variants``: name -> (module, settings); queries and K/V of ``dtype``."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    first = next(iter(variants))
    rows = []
    for (B, n), bits in itertools.product(shapes, bit_pairs):
        q = torch.randn(B, H, 1, D, device="cuda", dtype=dtype, generator=gen)
        k = torch.randn(B, HKV, n, D, device="cuda", dtype=dtype, generator=gen)
        v = torch.randn_like(k)
        hb, lb = map(int, bits.split("/"))
        cache = bench.mixed_cache(k, v, hb, lb, gen)
        del k, v

        def call(cache=cache, q=q):
            return torch.ops.zipvl.decode_attention(q, None, D ** -0.5, *cache)

        best, outs = {}, {}
        for _ in range(rounds):
            for name, (module, settings) in variants.items():
                use(module, settings)
                best[name] = min(best.get(name, float("inf")), bench.gpu_time(call))
                outs[name] = call().float()
        base = outs[first]
        for name in variants:
            diff = ((outs[name] - base).norm() / base.norm()).item()
            rows.append((B, n, bits, name, best[name] * 1e6, best[first] / best[name], diff))
        del cache
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", required=True,
                    help="NAME=PATH of a gluon_decode-like file, or 'installed'")
    ap.add_argument("--shapes", default="1x32768,1x131072,8x32768,8x131072",
                    help="comma-separated BATCHxCONTEXT")
    ap.add_argument("--bits", default="4/2,4/0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = ap.parse_args()
    from zipvl_compile.runtime import gluon_decode
    variants = {}
    for spec in args.variant:
        head, _, assignments = spec.partition(":")
        settings = {}
        for item in assignments.split(";") if assignments else ():
            key, _, value = item.partition("=")
            if not hasattr(triton_decode, key):
                ap.error(f"triton_decode has no setting {key!r}")
            settings[key] = ast.literal_eval(value)
            DEFAULTS.setdefault(key, getattr(triton_decode, key))
        name, _, path = head.partition("=")
        variants[name] = (load_variant(name, path) if path else gluon_decode, settings)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    rows = compare(variants, shapes, args.bits.split(","), args.rounds,
                   getattr(torch, args.dtype))
    use(gluon_decode, {})
    first = next(iter(variants))
    print(f"{'batch':>5} {'context':>7} {'bits':>4}  {'variant':<16} {'us':>7} "
          f"{'vs ' + first:>12} {'diff':>8}")
    for B, n, bits, name, us, ratio, diff in rows:
        print(f"{B:>5} {n:>7} {bits:>4}  {name:<16} {us:7.1f} {ratio:11.3f}x {diff:8.2e}")


if __name__ == "__main__":
    main()
