"""Throwaway (session 21): where the Gluon partial programs of one decode call run (SM) and
when (%globaltimer), from a CUDA-graph replay of the committed kernel instrumented
(``gluon_decode_trace_session21.py.txt``).  Per segment: programs, start/end spread, mean
duration; per SM: how many programs of each segment it ran, and when its last one ended.
Run from the repository root on a GPU."""
import collections
import statistics
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import decode_attention as bench  # noqa: E402
from ab_decode import load_variant  # noqa: E402
from zipvl_compile.runtime import triton_decode as td  # noqa: E402

tr = load_variant("trace", "benchmarks/results/gluon_decode_trace_session21.py.txt")
LAUNCHES = []
_launch = tr.launch


def launch(q, seg, bias, scale, m, den, acc, chunk, count, offset, n_chunks, pdl=(False, False)):
    LAUNCHES.append((seg.bits, offset, count, q.shape[0] * seg.kd.shape[1], chunk))
    return _launch(q, seg, bias, scale, m, den, acc, chunk, count, offset, n_chunks, pdl)


tr.launch = launch
td._GLUON = tr
H, HKV, D = 28, 4, 128
gen = torch.Generator(device="cuda").manual_seed(0)
sms = torch.cuda.get_device_properties(0).multi_processor_count
for (B, n), bits in (((1, 131072), "4/2"), ((1, 131072), "4/0"), ((8, 131072), "4/2"),
                     ((1, 32768), "4/2")):
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    hb, lb = map(int, bits.split("/"))
    cache = bench.mixed_cache(k, v, hb, lb, gen)
    del k, v
    t = bench.gpu_time(lambda: torch.ops.zipvl.decode_attention(q, None, D ** -0.5, *cache))
    torch.cuda.synchronize()
    segs = LAUNCHES[-2:] if lb else LAUNCHES[-1:]
    T = tr.TRACE.cpu()
    print(f"\n=== batch {B} context {n} {bits}: call {t * 1e6:.1f} us (graph); launches "
          f"(bits, chunk offset, chunks, rows, chunk slots) {segs}")
    progs = []   # (bits, sm, t0, t1)
    for b_, off, cnt, rows, _ in segs:
        for c in range(cnt):
            for r in range(rows):
                i = (off + c) * rows + r
                progs.append((b_, int(T[0, i]), int(T[1, i]), int(T[2, i])))
    t00 = min(p[2] for p in progs)
    for b_ in sorted({p[0] for p in progs}, reverse=True):
        ps = [p for p in progs if p[0] == b_]
        st = [(p[2] - t00) / 1e3 for p in ps]
        en = [(p[3] - t00) / 1e3 for p in ps]
        du = [(p[3] - p[2]) / 1e3 for p in ps]
        print(f"  {b_}-bit: {len(ps)} programs; start {min(st):.1f}..{max(st):.1f} us, end "
              f"{min(en):.1f}..{statistics.median(en):.1f}..{max(en):.1f} us (min/median/max), "
              f"duration mean {statistics.mean(du):.2f} min {min(du):.2f} max {max(du):.2f} us")
    per_sm = collections.defaultdict(lambda: collections.Counter())
    last = collections.defaultdict(float)
    for b_, sm, t0, t1 in progs:
        per_sm[sm][b_] += 1
        last[sm] = max(last[sm], (t1 - t00) / 1e3)
    mix = collections.Counter(tuple(sorted(c.items(), reverse=True)) for c in per_sm.values())
    print(f"  SMs used {len(per_sm)} of {sms}; programs per SM by bits (count of SMs): "
          + ", ".join(f"{dict(k)}: {v}" for k, v in sorted(mix.items(), key=lambda x: -x[1])))
    ends = sorted(last.values())
    print(f"  last program end per SM: min {ends[0]:.1f} p10 {ends[len(ends) // 10]:.1f} "
          f"median {statistics.median(ends):.1f} p90 {ends[9 * len(ends) // 10]:.1f} "
          f"max {ends[-1]:.1f} us")
    # SM-level: concurrency profile of each SM's heaviest mixes, and end time by mix
    by_mix = collections.defaultdict(list)
    for sm, c in per_sm.items():
        by_mix[tuple(sorted(c.items(), reverse=True))].append(last[sm])
    for k_, v_ in sorted(by_mix.items(), key=lambda x: -len(x[1]))[:6]:
        print(f"    mix {dict(k_)}: {len(v_)} SMs, last end median {statistics.median(v_):.1f} "
              f"max {max(v_):.1f} us")
    del cache
    torch.cuda.empty_cache()
