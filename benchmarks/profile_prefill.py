"""Where the time of one ZipVL prefill attention goes: CUDA kernels by total time.

    python benchmarks/profile_prefill.py --n 32768 --ratio 0.5 [--kernel sdpa]
"""
import argparse

import torch
import torch.nn.functional as F

import zipvl_compile


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--kernel", default="sdpa")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    q, k, v = (torch.randn(1, args.n, h, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for h in (28, 4, 4))
    f = torch.compile(Attn(), backend=zipvl_compile.backend(ratio=args.ratio, kernel=args.kernel),
                      dynamic=False)
    for _ in range(3):
        f(q, k, v)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            f(q, k, v)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows,
                                    max_name_column_width=70))


if __name__ == "__main__":
    main()
