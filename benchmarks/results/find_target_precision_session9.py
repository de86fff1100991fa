"""Record of a session-9 measurement (CPU, torch 2.13): on the shipped toy VLM, easy level (find),
zipvl tau=0.975 + ZipVLCache 4/2 with the harness's toy sizes, 128 held-out questions one at
a time: is the target patch held at high bits in each layer's cache, and does accuracy depend
on it?  Run from the repository root: python benchmarks/results/find_target_precision_session9.py
Output: benchmarks/results/find_target_precision_session9.txt"""
import torch
from zipvl_compile import eval as ev, ZipVLCache
from zipvl_compile.helpers import compile_language_model
from zipvl_compile.toyvlm import task
model, meta = ev.load_toyvlm()
bos_first = model.config.bos_first
N = 128
s = task.sample(N, model.config.grid, ev.EVAL_SEED + 0, levels=(0,))
compile_language_model(model, inductor=False, tau=0.975, **ev.TOY_PROBES)
rows = []
with torch.no_grad():
    for i in range(N):
        cache = ZipVLCache(high_bits=4, low_bits=2, **ev.TOY_CACHE)
        pred = model.answer(s.pixels[i:i + 1], s.text[i:i + 1], cache).argmax(-1).item()
        tgt = int(s.relevant[i].float().argmax()) + (1 if bos_first else 0)
        hi = []
        for layer in cache.layers:
            pos = layer.hi.pos[0] if layer.hi is not None else None
            hi.append(bool((pos == tgt).any()) if pos is not None else None)
        rows.append((pred == int(s.answer[i]), hi))
L = len(rows[0][1])
print("samples", N, "accuracy", sum(r[0] for r in rows) / N)
for l in range(L):
    held = [r for r in rows if r[1][l]]
    low = [r for r in rows if r[1][l] is False]
    print(f"layer {l}: target high-bit in {len(held)}/{N}; accuracy when high {sum(r[0] for r in held)}/{len(held)}, when low {sum(r[0] for r in low)}/{len(low)}")
allhi = [r for r in rows if all(r[1][1:])]
print("target high-bit in layers 1..: ", len(allhi), "accuracy", sum(r[0] for r in allhi), "/", len(allhi))
nothi = [r for r in rows if not all(r[1][1:])]
print("not in all:", len(nothi), "accuracy", sum(r[0] for r in nothi), "/", len(nothi))
