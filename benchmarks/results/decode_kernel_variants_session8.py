"""Record (not a maintained benchmark): the scratch script that timed decode-kernel variants
side by side in session 8 (128K, 4/2 and 4/0, batch 1 and 8).  It imports the variant modules
from .scratch/dev: td_base is runtime/triton_decode.py of commit 56c118d with its relative
import made absolute and a MAXNREG launch knob; the others are described in
decode_kernel_variants_session8_h100.txt.  Env: MODS (modules), PPS (programs per SM), DT
(dtype), CTX (context)."""
import importlib, sys, itertools, os
import torch
sys.path.insert(0, "."); sys.path.insert(0, ".scratch/dev")
import benchmarks.decode_attention as bda
from zipvl_compile.runtime import decode_attention as da

D = 128
mods = {m: importlib.import_module(m) for m in os.environ.get("MODS", "td_base td_asm td_asm2 td_ka").split()}
DT = getattr(torch, os.environ.get("DT", "bfloat16"))
n = int(os.environ.get("CTX", 131072))
rows = []
gen = torch.Generator(device="cuda").manual_seed(0)
for B in (1, 8):
    q = torch.randn(B, 28, 1, D, device="cuda", dtype=DT, generator=gen)
    k = torch.randn(B, 4, n, D, device="cuda", dtype=DT, generator=gen)
    v = torch.randn_like(k)
    dense = bda.dense_baselines(q, k, v)
    t_dense = min(t for t, _ in dense.values())
    print(f"B={B} dense best {t_dense*1e6:.1f} us", {m: round(t*1e6, 1) for m, (t, _) in dense.items()}, flush=True)
    for bits in ((4, 2), (4, 0)):
        if bits == (16, 16) and B == 8:
            continue
        cache = bda.mixed_cache(k, v, *bits, gen)
        segs = da.segments(*cache)
        ref = da.reference(q, segs, None, D ** -0.5)
        for name, mod in mods.items():
            for pps, mr in itertools.product(tuple(int(x) for x in os.environ.get("PPS", "2 4 8").split()), (None, 128)):
                if mr is not None and pps <= 2:
                    continue
                if hasattr(mod, "LARGE_PROGRAMS_PER_SM"):
                    mod.PROGRAMS_PER_SM = mod.LARGE_PROGRAMS_PER_SM = pps
                    mod.LARGE_FROM_TILES_PER_SM = 0 if mr else 10 ** 9
                    mod.REGISTER_CAP = mr or 0
                else:
                    mod.PROGRAMS_PER_SM, mod.MAXNREG = pps, mr
                try:
                    out = mod.decode(q, segs, None, D ** -0.5)
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    t = bda.gpu_time(lambda: mod.decode(q, segs, None, D ** -0.5))
                except Exception as e:  # noqa
                    print(name, bits, pps, mr, "FAILED", repr(e)[:300], flush=True)
                    continue
                rows.append((B, f"{bits[0]}/{bits[1]}", name, pps, mr, t * 1e6, t_dense / t, err))
                print(*rows[-1], flush=True)
        del cache
    del k, v
    torch.cuda.empty_cache()
from tabulate import tabulate
best = {}
for r in rows:
    key = (r[0], r[1], r[2])
    if key not in best or r[5] < best[key][5]:
        best[key] = r
print(tabulate([[*r[:5], f"{r[5]:.1f}", f"{r[6]:.2f}x", f"{r[7]:.2e}"] for r in best.values()],
               headers=["B", "bits", "variant", "prog/SM", "maxnreg", "us", "vs dense", "rel err"]))
