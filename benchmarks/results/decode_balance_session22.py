"""Session 22, throwaway: at 128K batch 1 the 2-bit programs end up to ~4 us after the 4-bit
ones (session 21's trace); does giving the two segments different chunk lengths (whole key
groups) balance them?  A/B in one process (``ab_decode.compare``), each variant replacing
``triton_decode._gluon_programs`` by one that launches rows * ceil(slots / chunk) programs per
segment for the given chunk length per code width."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ab_decode  # noqa: E402
from zipvl_compile.runtime import gluon_decode, triton_decode  # noqa: E402

original = triton_decode._gluon_programs
ab_decode.DEFAULTS["_gluon_programs"] = original


def chunks_of(lengths: dict):
    def programs(segs, gluon, rows, sms):
        return [rows * -(-s.slots // lengths[s.bits]) if on else 0
                for s, on in zip(segs, gluon)]
    return programs


variants = {"installed": (gluon_decode, {})}
for four, two in [(512, 384), (640, 384), (640, 512), (768, 384), (384, 384), (512, 256),
                  (384, 256)]:
    variants[f"4:{four},2:{two}"] = (gluon_decode, {"_gluon_programs": chunks_of({4: four, 2: two})})
rows = ab_decode.compare(variants, [(1, 131072)], ["4/2"], rounds=4)
ab_decode.use(gluon_decode, {})
print(f"{'batch':>5} {'context':>7} {'bits':>4}  {'variant':<16} {'us':>7} {'vs installed':>12} {'diff':>8}")
for B, n, bits, name, us, ratio, diff in rows:
    print(f"{B:>5} {n:>7} {bits:>4}  {name:<16} {us:7.1f} {ratio:11.3f}x {diff:8.2e}")
