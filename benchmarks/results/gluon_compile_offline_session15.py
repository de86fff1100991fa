"""Throwaway (session 15): compile a Gluon decode kernel (``_partials`` of a
``gluon_decode.py``-like file) for sm_90 on a machine without a GPU, and print its registers,
spilled bytes, shared memory, whole-kernel SASS op counts and the op counts of one tile body
(the instructions between the 4th and 6th ``BAR.SYNC``: the second tile of the first key group,
two barriers per tile).  Needs a venv with ``triton==3.6.0`` (its bundled ptxas, cuobjdump and
nvdisasm) and torch, and this package installed (``pip install --no-deps -e .``).

usage: python gluon_compile_offline_session15.py KERNEL_FILE
  env: BITS (4), DT (bf16 | fp16), BN (slots per tile, the module's TILE), NS (ring stages),
       MAXNREG (0: none; default the module's MAX_REGISTERS), SASS (where to write the SASS)

Integer arguments are marked divisible by 16 (as the launcher specializes the benchmark's
strides and lengths), so registers match the device's (168 at 4 bits, session 14's ncu)."""
import collections
import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import compile as tcompile
from triton.experimental.gluon._runtime import GluonASTSource

from zipvl_compile.runtime import quant

loader = importlib.machinery.SourceFileLoader("zipvl_compile.runtime.gluon_offline", sys.argv[1])
gd = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
sys.modules[loader.name] = gd
loader.exec_module(gd)

bits = int(os.environ.get("BITS", 4))
dt = torch.bfloat16 if os.environ.get("DT", "bf16") == "bf16" else torch.float16
ns = int(os.environ.get("NS", gd.STAGES))
tile = int(os.environ.get("BN", gd.TILE))
maxnreg = int(os.environ.get("MAXNREG", gd.MAX_REGISTERS[bits]))
D, W = 128, 128 * bits // 8
const = dict(BITS=bits, GROUP=128, D=D, W=W, HAS_BIAS=False,
             MAGIC_C=quant.float_magic(dt, bits)[1] + quant.middle_code(bits),
             ASM=gd.pairs_asm(bits, dt), BN=tile, NS=ns, **gd.layouts(W, tile))
if hasattr(gd, "plane8_asm"):   # the int8-MMA key variant
    const.update(MIDDLE=quant.middle_code(bits),
                 **{f"KA{j}": gd.plane8_asm(bits, min(j, 8 // bits - 1)) for j in range(4)})
fn = gd._partials
# the grid-dependency flags of later kernels (session 17): env GDC_NEXT / GDC_WAIT, 0 or 1
const.update({k: bool(int(os.environ.get(k, 0))) for k in ("GDC_NEXT", "GDC_WAIT")
              if k in fn.arg_names})
pointers = {"Q": "*bf16" if dt == torch.bfloat16 else "*fp16", "BIAS": "*fp32",
            "M_OUT": "*fp32", "L_OUT": "*fp32", "ACC_OUT": "*fp32"}
sig, attrs = {}, {}
for i, name in enumerate(fn.arg_names):
    if name in const:
        sig[name] = "constexpr"
        continue
    sig[name] = pointers.get(name, "*i32" if name in ("KD", "KS", "KM", "VD", "VS", "VM", "POS")
                             else "fp32" if name == "qscale" else "i32")
    if sig[name] != "fp32" and name not in ("Hkv", "n_heads_per_kv", "chunk_offset",
                                            "n_chunks_total"):
        attrs[(i,)] = [["tt.divisibility", 16]]
kernel = tcompile(GluonASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                  options={"num_warps": 1, **({"maxnreg": maxnreg} if maxnreg else {})})
with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
    f.write(kernel.asm["cubin"])
tools = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
usage = subprocess.run([f"{tools}/cuobjdump", "-res-usage", f.name], capture_output=True,
                       text=True).stdout
regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
sass = subprocess.run([f"{tools}/nvdisasm", "-c", f.name], capture_output=True, text=True).stdout
open(os.environ.get("SASS", os.path.join(tempfile.gettempdir(), "gluon_offline.sass")),
     "w").write(sass)
lines = sass.splitlines()
OP = re.compile(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def ops(rows):
    return collections.Counter(m.group(1) for m in map(OP.match, rows) if m)


whole = ops(lines)
bars = [i for i, line in enumerate(lines) if "BAR.SYNC" in line]
body = ops(lines[bars[3]:bars[5]]) if len(bars) > 5 else collections.Counter()
print(f"bits {bits} {os.environ.get('DT', 'bf16')} tile {tile} stages {ns} cap {maxnreg or '-'}: "
      f"registers {regs.group(1)}, stack {regs.group(2)} B, shared {kernel.metadata.shared} B")
print(f"kernel: {sum(whole.values())} SASS ({whole['LDL']} LDL, {whole['STL']} STL)",
      dict(whole.most_common(12)))
print(f"one tile body: {sum(body.values())} SASS", dict(body.most_common(16)))
