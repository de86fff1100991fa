"""Throwaway (session 14): Part C of kv_quality.py with ours at residual_length 0 (quanto keeps
the toy's 16; groups of 32 for both), for 4/4, 4/2, 2/2 and 4/0.  Run from the repository
root; CPU."""
import sys, time
sys.path.insert(0, "."); sys.path.insert(0, "benchmarks")
import kv_quality as kq
from zipvl_compile import ZipVLCache


class R0(ZipVLCache):
    def __init__(self, config=None, **fields):
        super().__init__(config, **dict(fields, residual_length=0))


t = time.time()
kq.OURS = [(4, 4), (4, 2), (2, 2), (4, 0)]
kq.ZipVLCache = R0
rows, levels = kq.part_c(128)
for r in rows:
    print(r["cache"], " | ".join(kq.toy_cell(r[lv]) for lv in levels))
print("time", time.time() - t)
