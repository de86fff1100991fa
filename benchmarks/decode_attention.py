"""One decode step of attention for a Qwen2-7B (or LLaVA-7B: --shape) layer over a long KV cache.

28 query heads, 4 KV heads, head dim 128, bf16 (``--dtype float16``: fp16).  Baseline: PyTorch
SDPA over the 16-bit cache (every available backend -- flash, cuDNN, efficient -- is timed and
the fastest is the baseline).  ZipVL: ``zipvl::decode_attention`` (Gluon and Triton kernels)
over a mixed-precision cache built directly (random K/V, a random half of the prompt
important, as ``ZipVLCache`` stores it after a hand-over), at the default 4/2 and at 4/0.  Each call is captured in a CUDA graph (20 calls
per replay) so that times are GPU times, as in a CUDA-graph decode loop; eager times (Python
and launch overhead included) are printed too.

    python benchmarks/decode_attention.py [--contexts 8192 32768 131072] [--batches 1 8]

Prints one table; ``--json`` writes the rows.  Achieved bandwidth = bytes the kernel must read
(packed codes, scales, middle values, slot positions, residual window, q) / time.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from zipvl_compile.runtime import decode_attention as da, kv_split  # noqa: E402

H, HKV, D = 28, 4, 128
DTYPE, DTYPE_NAME = torch.bfloat16, "bf16"
SHAPES = {"qwen2-7b": (28, 4), "llava-7b": (32, 32)}  # (query heads, KV heads), head dim 128


def gpu_time(fn, reps=20, graph=True) -> float:
    """Seconds per call: median over 5 replays of a CUDA graph of ``reps`` calls."""
    fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            with torch.cuda.graph(g, stream=stream):
                for _ in range(reps):
                    fn()
        torch.cuda.current_stream().wait_stream(stream)
        run = g.replay
    else:
        def run():
            for _ in range(reps):
                fn()
    times = []
    for _ in range(6):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 / reps)
    return sorted(times[1:])[2]


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of a 2 GiB tensor: the
    best of ``copy_`` replayed from a CUDA graph (a memcpy node), ``copy_`` launched eagerly
    and an elementwise kernel (``torch.mul(x, 1, out=y)``), each a median of repeated runs
    (session 11 on an H200: the graph's memcpy node reached 2.7 TB/s, far below what kernels
    read, so it alone understated the ceiling)."""
    x = torch.randn(1 << 29, device="cuda")  # 2 GiB of fp32
    y = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()
    times = {"graph copy_": gpu_time(lambda: y.copy_(x), reps=5),
             "eager copy_": gpu_time(lambda: y.copy_(x), reps=5, graph=False),
             "kernel": gpu_time(lambda: torch.mul(x, 1.0, out=y), reps=5)}
    print("copy bandwidth (TB/s):", {k: round(nbytes / t / 1e12, 2) for k, t in times.items()})
    return nbytes / min(times.values())


def dense_baselines(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def call(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        try:
            result = call()
            out[name] = (gpu_time(call), result)
        except RuntimeError:
            continue
    return out


def mixed_cache(k, v, high_bits, low_bits, gen):
    """kernel_args of a cache layer holding k, v with a random half important."""
    B, _, n, _ = k.shape
    kept_idx = torch.stack([torch.randperm(n, generator=gen, device="cuda") for _ in range(B)])
    budget = torch.full((B,), n // 2, device="cuda")
    kept_idx = torch.cat([kept_idx[:, :n // 2].sort(-1).values,
                          kept_idx[:, n // 2:].sort(-1).values], dim=1)
    plan = kv_split.plan(n, kept_idx, budget, residual_length=128)
    split = kv_split.split_by_importance(k, v, plan, plan.counts.tolist(), high_bits=high_bits,
                                         low_bits=low_bits, group_size=128, vgroup=128)
    lo = split.lo.tensors() if split.lo is not None else (None,) * 7
    return (*split.hi.tensors(), *lo, split.res_k, split.res_v, None, high_bits,
            low_bits if split.lo is not None else 0, 128, 128, n, split.evicted)


def nbytes(args) -> int:
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def sweep(contexts, batches):
    """Launch parameters of the Triton kernel (programs per SM, register cap), 4/2 cache, with
    the Gluon kernel off (``USE_GLUON``)."""
    import itertools

    from tabulate import tabulate
    from zipvl_compile.runtime import triton_decode as td

    td.USE_GLUON = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for B, n in itertools.product(batches, contexts):
        q = torch.randn(B, H, 1, D, device="cuda", dtype=DTYPE, generator=gen)
        k = torch.randn(B, HKV, n, D, device="cuda", dtype=DTYPE, generator=gen)
        v = torch.randn_like(k)
        cache = mixed_cache(k, v, 4, 2, gen)
        read = nbytes(cache)
        for per_sm, cap in itertools.product((2, 4, 8), (None, 128)):
            td.PROGRAMS_PER_SM = td.LARGE_PROGRAMS_PER_SM = per_sm
            td.LARGE_FROM_TILES_PER_SM = 10 ** 9 if cap is None else 0
            td.REGISTER_CAP = cap or 0
            t = gpu_time(lambda: torch.ops.zipvl.decode_attention(q, None, D ** -0.5, *cache))
            rows.append([B, n, per_sm, cap or "-", f"{t * 1e6:.1f}", f"{read / t / 1e12:.2f}"])
        del k, v, cache
        torch.cuda.empty_cache()
    print(tabulate(rows, headers=["batch", "context", "programs/SM", "max registers", "us",
                                  "TB/s"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--json")
    ap.add_argument("--bits", nargs="+", default=["4/2", "4/0"],
                    help="cache settings high/low to time (default: 4/2 4/0)")
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen2-7b",
                    help="head layout of the layer (default: Qwen2-7B, 7 query heads per KV head)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16",
                    help="dtype of q and of the dense cache (default bfloat16)")
    ap.add_argument("--sweep", action="store_true",
                    help="time kernel launch parameters (4/2 cache), then exit")
    args = ap.parse_args()
    from tabulate import tabulate

    global H, HKV, DTYPE, DTYPE_NAME
    H, HKV = SHAPES[args.shape]
    DTYPE = getattr(torch, args.dtype)
    DTYPE_NAME = {"bfloat16": "bf16", "float16": "fp16"}[args.dtype]
    if args.sweep:
        return sweep(args.contexts, args.batches)

    copy_bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"device-to-device copy {copy_bw / 1e12:.2f} TB/s  layer: {H} query heads, {HKV} KV "
          f"heads, head dim {D}, {DTYPE_NAME}")
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for B in args.batches:
        for n in args.contexts:
            q = torch.randn(B, H, 1, D, device="cuda", dtype=DTYPE, generator=gen)
            k = torch.randn(B, HKV, n, D, device="cuda", dtype=DTYPE, generator=gen)
            v = torch.randn(B, HKV, n, D, device="cuda", dtype=DTYPE, generator=gen)
            dense = dense_baselines(q, k, v)
            best = min(dense, key=lambda name: dense[name][0])
            t_dense, ref = dense[best]
            dense_bytes = nbytes([q, k, v])
            rows.append(dict(batch=B, context=n, kernel=f"{DTYPE_NAME} SDPA ({best})",
                             us=t_dense * 1e6,
                             eager_us=None, bytes=dense_bytes, tbps=dense_bytes / t_dense / 1e12,
                             speedup=1.0, rel_err=0.0,
                             others={m: round(t * 1e6, 1) for m, (t, _) in dense.items()}))
            for hb, lb in (tuple(map(int, b.split("/"))) for b in args.bits):
                cache = mixed_cache(k, v, hb, lb, gen)

                def fused(cache=cache):
                    return torch.ops.zipvl.decode_attention(q, None, D ** -0.5, *cache)
                t = gpu_time(fused)
                t_eager = gpu_time(fused, graph=False)
                out = fused()
                read = nbytes(cache) + nbytes([q])
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                rows.append(dict(batch=B, context=n, kernel=f"zipvl {hb}/{lb}", us=t * 1e6,
                                 eager_us=t_eager * 1e6, bytes=read, tbps=read / t / 1e12,
                                 speedup=t_dense / t, rel_err=err))
                del cache
            del k, v
            torch.cuda.empty_cache()
    table = [[r["batch"], r["context"], r["kernel"], f"{r['us']:.1f}",
              "-" if r["eager_us"] is None else f"{r['eager_us']:.1f}", f"{r['bytes'] / 1e6:.1f}",
              f"{r['tbps']:.2f}", f"{100 * r['tbps'] * 1e12 / copy_bw:.0f}%",
              f"{r['speedup']:.2f}x", f"{r['rel_err']:.3f}"] for r in rows]
    print(tabulate(table, headers=["batch", "context", "kernel", "graph us", "eager us",
                                   "MB read", "TB/s", "of copy BW", "speedup", "rel err"]))
    print("dense backends (us):", {(r["batch"], r["context"]): r["others"]
                                   for r in rows if "others" in r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           shape=args.shape, dtype=args.dtype, heads=H, kv_heads=HKV,
                           copy_tbps=copy_bw / 1e12, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
