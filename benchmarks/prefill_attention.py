"""Prefill attention of one Qwen2-7B layer: dense SDPA (flash, cuDNN) vs the whole ZipVL attention.

    python benchmarks/prefill_attention.py [--lengths 8192 32768 131072] [--out results.json]

Inputs are stored [B, n, heads, d] (the layout a model's projections produce) for every kernel.
ZipVL runs through the real backend (``torch.compile(..., backend=zipvl_compile.backend(...))``
over a module that calls SDPA), so the time covers scoring, selection, gather, sparse attention
and scatter.  Random inputs have no attention sparsity: the kept ratio is forced with ``ratio=``
(and "adaptive" reports what tau=0.975 keeps on random data).  Columns:

- ``kernel``: SDPA (cuDNN first) on a contiguous prefix of ``p`` tokens, the floor of the sparse
  attention itself; ``overhead`` = total - kernel (scoring, selection, gather/scatter);
  ``ovh%`` = overhead / fastest dense; ``speedup`` = fastest dense / ZipVL total.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import zipvl_compile
from zipvl_compile.runtime import selection

H, HKV, D = 28, 4, 128


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def bench(fn, reps=20):
    from triton.testing import do_bench

    return do_bench(fn, warmup=5 * reps, rep=20 * reps, return_mode="median")


def dense(q, k, v, backend):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def dense_cudnn_timing(q, k, v):
    """cuDNN with native GQA if it accepts it, else with K/V expanded beforehand (not timed)."""
    try:
        dense(q, k, v, SDPBackend.CUDNN_ATTENTION)
        return bench(lambda: dense(q, k, v, SDPBackend.CUDNN_ATTENTION)), "gqa"
    except RuntimeError:
        ke, ve = (x.repeat_interleave(H // HKV, 1) for x in (k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            f = lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True)  # noqa: E731
            return bench(f), "expanded"


def prefix_kernel(q, k, v, p):
    qs, ks, vs = (x[:, :, :p] for x in (q, k, v))  # stays [B, p, h, d]-contiguous
    best = math.inf
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            best = min(best, bench(lambda: dense(qs, ks, vs, be)))
        except RuntimeError:
            pass
    return best


def tau_one_error(n):
    """bf16 relative error vs an fp32 dense reference, at ``n`` tokens: dense cuDNN/flash bf16
    and ZipVL with tau=1 (every token kept) bf16."""
    q, k, v = (torch.randn(1, n, h, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for h in (H, HKV, HKV))
    ref = F.scaled_dot_product_attention(*(x.float() for x in (q, k, v)), is_causal=True,
                                         enable_gqa=True)
    torch._dynamo.reset()
    f = torch.compile(Attn(), backend=zipvl_compile.backend(tau=1.0), dynamic=False)
    with torch.no_grad():
        out = {"dense bf16": dense(q, k, v, SDPBackend.CUDNN_ATTENTION), "zipvl tau=1 bf16": f(q, k, v)}
    return {name: ((o.float() - ref).norm() / ref.norm()).item() for name, o in out.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--settings", nargs="+", default=["0.3", "0.5", "adaptive", "0.5:flex"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--check-n", type=int, default=8192, help="length of the tau=1 error check")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for n in args.lengths:
        q, k, v = (torch.randn(1, n, h, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                   for h in (H, HKV, HKV))  # stored [B, n, h, d], as projections leave them
        t_flash = bench(lambda: dense(q, k, v, SDPBackend.FLASH_ATTENTION))
        t_cudnn, cudnn_form = dense_cudnn_timing(q, k, v)
        fastest = min(t_flash, t_cudnn)
        for setting in args.settings:
            ratio_s, _, kernel = setting.partition(":")
            kernel = kernel or "sdpa"
            ratio = None if ratio_s == "adaptive" else float(ratio_s)
            zipvl_compile.reset_stats()
            torch._dynamo.reset()
            be = zipvl_compile.backend(ratio=ratio, kernel=kernel)
            f = torch.compile(Attn(), backend=be, dynamic=False)
            with torch.no_grad():
                f(q, k, v)
                kept = zipvl_compile.stats()[0].kept[0]
                t_total = bench(lambda: f(q, k, v))
            t_kernel = prefix_kernel(q, k, v, kept)
            sel = torch.compile(lambda q, k: selection.select(
                q, k, attn_mask=None, scale=D ** -0.5, tau=0.975, ratio=ratio, recent_probes=64,
                random_probes=64, keep_recent=64, min_keep=1, seed=0, salt=0,
                keep_all=False).kept_idx, dynamic=False)
            sel(q, k)
            t_select = bench(lambda: sel(q, k))
            rows.append(dict(n=n, setting=setting, kept=kept, ratio=kept / n, flash=t_flash,
                             cudnn=t_cudnn, cudnn_form=cudnn_form, zipvl=t_total,
                             kernel=t_kernel, select=t_select,
                             overhead=t_total - t_kernel,
                             overhead_share=(t_total - t_kernel) / fastest,
                             speedup=fastest / t_total, ideal=fastest / t_kernel))
            print(json.dumps(rows[-1]), flush=True)
    from tabulate import tabulate

    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {__import__('triton').__version__}  bf16, H={H} Hkv={HKV} d={D}, batch 1")
    print(tabulate([[r["n"], r["setting"], f"{r['ratio']:.3f}", f"{r['flash']:.3f}",
                     f"{r['cudnn']:.3f}", f"{r['zipvl']:.3f}", f"{r['kernel']:.3f}",
                     f"{r['select']:.3f}", f"{r['overhead']:.3f}",
                     f"{100 * r['overhead_share']:.1f}", f"{r['speedup']:.2f}x",
                     f"{r['ideal']:.2f}x"] for r in rows],
                   headers=["N", "zipvl", "kept", "flash ms", "cudnn ms", "zipvl ms", "kernel ms",
                            "select ms", "overhead ms", "ovh%", "speedup", "kernel-only"]))
    errors = tau_one_error(args.check_n)
    print(f"\nrelative error vs fp32 dense at N={args.check_n}: " +
          ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"rows": rows, "tau_one_error": errors}, fh, indent=1)


if __name__ == "__main__":
    main()
