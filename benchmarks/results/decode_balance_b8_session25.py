"""Session 25, throwaway: at 128K batch 8, 4/2, does another chunk length per code width (whole
key groups) beat the per-width rule (``GLUON_PROGRAMS_PER_SM``: 2048 slots at 4 bits, 1408 at
2)?  And at 128K batch 1 the short rule's (512 and 512), with at most 8 programs per SM in all
(uncapped kernels)?  A/B in one process (``ab_decode.compare``), each variant replacing
``triton_decode._gluon_programs`` by one that launches rows * ceil(slots / chunk) programs per
segment for the given chunk lengths.  Run from the repository root on a GPU."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ab_decode  # noqa: E402
from zipvl_compile.runtime import gluon_decode, triton_decode  # noqa: E402

ab_decode.DEFAULTS["_gluon_programs"] = triton_decode._gluon_programs


def chunks_of(lengths: dict):
    def programs(segs, gluon, rows, sms):
        return [rows * -(-s.slots // lengths[s.bits]) if on else 0
                for s, on in zip(segs, gluon)]
    return programs


def table(shape, pairs):
    variants = {"installed": (gluon_decode, {})}
    for four, two in pairs:
        variants[f"4:{four},2:{two}"] = (gluon_decode,
                                         {"_gluon_programs": chunks_of({4: four, 2: two})})
    return ab_decode.compare(variants, [shape], ["4/2"], rounds=5)


rows = table((8, 131072), [(f, t) for f in (1792, 2048, 2304)
                           for t in (1152, 1280, 1408, 1536, 1664)])
rows += table((1, 131072), [(512, 512), (768, 384), (640, 512), (512, 640), (1024, 384)])
ab_decode.use(gluon_decode, {})
print(f"{'batch':>5} {'context':>7} {'bits':>4}  {'variant':<16} {'us':>7} {'vs installed':>12} "
      f"{'diff':>8}")
for B, n, bits, name, us, ratio, diff in rows:
    print(f"{B:>5} {n:>7} {bits:>4}  {name:<16} {us:7.1f} {ratio:11.3f}x {diff:8.2e}")
