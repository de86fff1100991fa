"""Throwaway (session 15): the 4-bit and the 2-bit segment's Gluon partial kernels side by side
on the same SMs: the 2-bit launch on a side stream forked before the 4-bit launch and joined
before the merge (parallel branches of the CUDA graph), each kernel sized for a share of the
programs per SM (the 4-bit segment reads DRAM at 60% of peak at 128K batch 8, the 2-bit at 36%:
session 15's ncu).  Against one stream.  Best of two interleaved rounds of CUDA-graph medians.
Run from the repository root."""
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import decode_attention as bench  # noqa: E402
from zipvl_compile.runtime import gluon_decode as gd, triton_decode as td  # noqa: E402

SIDE = torch.cuda.Stream()
STATE = {"concurrent": False, "per_sm": {4: 12, 2: 12}, "queue": []}
_launch = gd.launch
_chunking = td._chunking


def launch(q, seg, *args):
    STATE["queue"].clear()
    if not STATE["concurrent"]:
        return _launch(q, seg, *args)
    main = torch.cuda.current_stream()
    if seg.bits == 4:            # launched first: fork the side stream before it
        SIDE.wait_stream(main)
        return _launch(q, seg, *args)
    with torch.cuda.stream(SIDE):
        _launch(q, seg, *args)
    main.wait_stream(SIDE)       # before the merge


def chunking(slots, programs_per_chunk, target, tile):
    # decode() asks supported() for every segment first, then plans the Gluon segments in the
    # same order with target = GLUON_PROGRAMS_PER_SM * sms: the queue says whose plan it is
    if target == td.GLUON_PROGRAMS_PER_SM * SMS and STATE["queue"]:
        target = STATE["per_sm"][STATE["queue"].pop(0)] * SMS
    return _chunking(slots, programs_per_chunk, target, tile)


_supported = gd.supported


def supported(seg, q):
    ok = _supported(seg, q)
    if ok:
        STATE["queue"].append(seg.bits)
    return ok


gd.launch, td._chunking, gd.supported = launch, chunking, supported
SMS = torch.cuda.get_device_properties(0).multi_processor_count
CONFIGS = {  # name: (concurrent, programs per SM for 4 / 2 bits)
    "one stream, 12/12": (False, {4: 12, 2: 12}),
    "concurrent, 12/12": (True, {4: 12, 2: 12}),
    "concurrent, 6/6": (True, {4: 6, 2: 6}),
    "concurrent, 7/5": (True, {4: 7, 2: 5}),
    "concurrent, 5/7": (True, {4: 5, 2: 7}),
    "concurrent, 8/8": (True, {4: 8, 2: 8}),
}
H, HKV, D = 28, 4, 128
gen = torch.Generator(device="cuda").manual_seed(0)
rows = []
for B, n in ((1, 131072), (8, 131072), (8, 32768)):
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    cache = bench.mixed_cache(k, torch.randn_like(k), 4, 2, gen)
    del k
    call = lambda: torch.ops.zipvl.decode_attention(q, None, D ** -0.5, *cache)  # noqa: E731
    best, outs = {}, {}
    for _ in range(2):
        for name, (conc, per_sm) in CONFIGS.items():
            STATE["concurrent"], STATE["per_sm"] = conc, per_sm
            t = bench.gpu_time(call)
            best[name] = min(best.get(name, 1e9), t)
            outs[name] = call().float()
    base = outs["one stream, 12/12"]
    for name in CONFIGS:
        diff = ((outs[name] - base).norm() / base.norm()).item()
        rows.append((B, n, name, best[name] * 1e6, best["one stream, 12/12"] / best[name], diff))
        print(rows[-1], flush=True)
    del cache
    torch.cuda.empty_cache()
print(f"{'batch':>5} {'context':>8} {'4/2 settings':>20} {'graph us':>9} {'vs one':>7} {'rel diff':>9}")
for B, n, name, us, sp, diff in rows:
    print(f"{B:5d} {n:8d} {name:>20} {us:9.1f} {sp:6.3f}x {diff:9.2e}")
