"""Compile the Gluon decode kernel (``_partials`` of ``zipvl_compile/runtime/gluon_decode.py``
or of a file shaped like it) for sm_90 without a GPU and count its SASS: registers, spills,
shared memory, and the instructions of one iteration of its tile loop (the loop closed by a
backward branch, without the regions its forward branches skip: the per-key-group setup).

Needs ``triton`` (3.6: its bundled ptxas, cuobjdump and nvdisasm) and this package.  Integer
arguments are marked divisible by 16, as the launcher specializes the benchmark's strides, so
the registers match the device's.

usage: python benchmarks/gluon_sass.py [--file gluon_decode.py] [--bits 2] [--dtype bf16]
                                       [--sass out.sass] [--uncapped]
"""
from __future__ import annotations

import argparse
import collections
import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import torch

OP = re.compile(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
BRANCH = re.compile(r"BRA\s+(?:!?U?P\w+,\s*)?`?\(\.(L_x_\d+)\)")   # (BRA P0, `(.L_x_1))


def load(path: str | None):
    if path is None:
        from zipvl_compile.runtime import gluon_decode
        return gluon_decode
    name = "zipvl_compile.runtime.gluon_sass_variant"
    loader = importlib.machinery.SourceFileLoader(name, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    sys.modules[name] = module
    loader.exec_module(module)
    return module


def compile_sm90(gd, bits: int, dtype: torch.dtype, capped: bool = True):
    """(cubin bytes, shared memory bytes) of ``gd._partials`` for sm_90 (``capped``: under
    ``gd.MAX_REGISTERS``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as tcompile
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = gd._partials
    const = dict(gd.constants(bits, dtype, 128, 128, False), GDC_NEXT=False, GDC_WAIT=False)
    pointers = {"Q": "*bf16" if dtype == torch.bfloat16 else "*fp16", "BIAS": "*fp32",
                "M_OUT": "*fp32", "L_OUT": "*fp32", "ACC_OUT": "*fp32"}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
            continue
        sig[name] = pointers.get(name, "*i32" if name in ("KD", "KS", "KM", "VD", "VS", "VM",
                                                          "POS")
                                 else "fp32" if name == "qscale" else "i32")
        if sig[name] != "fp32" and name not in ("Hkv", "n_heads_per_kv", "per", "extra",
                                                "chunk_offset", "n_chunks_total"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    opts = gd.options(bits, capped)
    kernel = tcompile(GluonASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                      options=opts)
    return kernel.asm["cubin"], kernel.metadata.shared


def loop_ops(lines: list[str]) -> collections.Counter:
    """Op counts of one iteration of the innermost backward-branch loop, forward-skipped
    regions excluded."""
    labels = {ln.strip()[1:-1]: i for i, ln in enumerate(lines) if ln.strip().startswith(".L_x")}
    branches = [(i, m.group(1)) for i, ln in enumerate(lines) if (m := BRANCH.search(ln))]
    back = [(labels[t], i) for i, t in branches if labels[t] < i - 1]  # (not the exit trap)
    start, end = min(back, key=lambda se: se[1] - se[0])
    skipped = set()
    for i, t in branches:
        if start < i < end and i < labels[t] <= end:
            skipped |= set(range(i + 1, labels[t]))
    rows = [ln for k, ln in enumerate(lines[start:end + 1], start=start) if k not in skipped]
    return collections.Counter(m.group(1) for m in map(OP.match, rows) if m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", help="a gluon_decode-like file with its ``constants`` and "
                    "``options`` (default: the installed module)")
    ap.add_argument("--bits", type=int, default=2, choices=(2, 4))
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--sass", help="also write the SASS here")
    ap.add_argument("--uncapped", action="store_true",
                    help="without the register cap (launches of few programs per SM)")
    args = ap.parse_args()
    import triton

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    cubin, shared = compile_sm90(load(args.file), args.bits, dtype, not args.uncapped)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    usage = subprocess.run([f"{tools}/cuobjdump", "-res-usage", f.name], capture_output=True,
                           text=True).stdout
    regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    sass = subprocess.run([f"{tools}/nvdisasm", "-c", f.name], capture_output=True,
                          text=True).stdout
    os.unlink(f.name)
    if args.sass:
        open(args.sass, "w").write(sass)
    lines = sass.splitlines()
    whole = collections.Counter(m.group(1) for m in map(OP.match, lines) if m)
    tile = loop_ops(lines)
    print(f"{args.bits}-bit {args.dtype}: registers {regs.group(1)}, stack {regs.group(2)} B, "
          f"shared {shared} B; kernel {sum(whole.values())} SASS "
          f"({whole['LDL']} LDL, {whole['STL']} STL)")
    print(f"one tile-loop iteration: {sum(tile.values())} SASS", dict(tile.most_common(12)))


if __name__ == "__main__":
    main()
