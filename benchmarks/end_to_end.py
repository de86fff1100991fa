"""End to end on one GPU: time to first token and decoding of a 7B-class language model
(issue 4).  Random weights (architecture configs from ``transformers``), bf16, batch 1 prefill.

Random weights have no attention sparsity, so ZipVL runs with a forced kept ratio (``ratio=``);
every table says so.

    python benchmarks/end_to_end.py --part ttft --contexts 32768 131072
    python benchmarks/end_to_end.py --part stages --contexts 32768 131072   # Table E
    python benchmarks/end_to_end.py --part decode --contexts 32768 131072 --batches 1 8

TTFT: one prefill forward (``logits_to_keep=1``) of dense eager (transformers' SDPA default),
dense eager with cuDNN SDPA forced, dense compiled with Inductor, and ZipVL (zipvl backend) at
kept ratio 0.45 and 0.3, each into a bf16 ``DynamicCache``, and ZipVL at 0.45 into a
``ZipVLCache`` (4/2: the prefill hands its selection to the cache, which keeps only the
quantized pools); median of ``--reps`` runs after a warm-up (compilation) run; peak GPU memory
of the timed runs (``torch.cuda.max_memory_allocated``) and the bytes the cache holds after the
prefill.

Decode: the cache is built directly (random K/V of the context length, a random half of the
prompt important for ZipVLCache), then greedy decode steps of the compiled language model
(zipvl backend: dense decode attention for DynamicCache, the fused kernel for ZipVLCache):
warm-up steps until one compiles no new graph, then ``--steps`` timed steps; tokens/s = batch /
median step time; peak GPU memory, cache bytes, graphs compiled so far and during the timed
steps.  ``--cuda-graphs``: the same with static-shape caches (bf16: transformers' StaticCache;
``ZipVLCache(max_cache_len=...)``) under ``mode="reduce-overhead"``, so that each step replays
a CUDA graph; the table then also counts graphs Inductor kept out of CUDA graphs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
import zipvl_compile  # noqa: E402
from zipvl_compile import ZipVLCache, ZipVLConfig  # noqa: E402
from zipvl_compile.runtime import kv_split  # noqa: E402

SHAPES = {
    # LongVA-7B's language model = Qwen2-7B
    "qwen2-7b": ("Qwen2Config", "Qwen2ForCausalLM",
                 dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                      max_position_embeddings=131072 + 4096, rope_theta=1e6)),
    # LLaVA-1.5/NeXT-7B's language model = Vicuna-7B (Llama-2-7B shape)
    "llava-7b": ("LlamaConfig", "LlamaForCausalLM",
                 dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=131072 + 4096)),
}


def build(shape: str):
    import transformers

    cfg_cls, model_cls, kw = SHAPES[shape]
    cfg = getattr(transformers, cfg_cls)(**kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = getattr(transformers, model_cls)(cfg).eval()
        finally:
            torch.set_default_dtype(prev)
    return model


def timed(fn, reps):
    fn()  # warm-up (compilation)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated()


TTFT_VARIANTS = [
    # (name, how, settings): how = "eager" / "cudnn" / "inductor" / "zipvl"; the prefill fills
    # a bf16 DynamicCache unless the name ends in "ZipVLCache 4/2"
    ("dense eager (transformers SDPA default)", "eager", {}),
    ("dense eager (cuDNN SDPA)", "cudnn", {}),
    ("dense compiled (Inductor)", "inductor", {}),
    ("zipvl ratio 0.45", "zipvl", dict(ratio=0.45)),
    ("zipvl ratio 0.30", "zipvl", dict(ratio=0.30)),
    ("zipvl ratio 0.45 + ZipVLCache 4/2", "zipvl", dict(ratio=0.45)),
]
# The paper's Table E: cumulative cost as each stage is added.  The scoring rows run the
# adaptive budget (tau, which sorts) and then exact dense attention (``stop_after``); the last
# row is the full method at the forced ratio (which needs no sort).
STAGE_VARIANTS = [
    ("dense eager (transformers SDPA default)", "eager", {}),
    ("+ probe scoring (dense attention)", "zipvl", dict(stop_after="scores")),
    ("+ sort and cumsum (dense attention)", "zipvl", dict(stop_after="budget")),
    ("+ normalize and top-k (dense attention)", "zipvl", dict(stop_after="selection")),
    ("+ sparse attention = zipvl ratio 0.45", "zipvl", dict(ratio=0.45)),
]


def ttft(shape, contexts, reps, variants, skip=(), profile=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import DynamicCache

    model = build(shape)
    rows = []
    for name, how, settings in variants:
        if any(word in name for word in skip):
            continue
        torch._dynamo.reset()
        lm = model.model
        compiled = torch.compile(lm) if how == "inductor" else None
        if how == "zipvl":
            zipvl_compile.compile_language_model(model, **settings)
        make_cache = (lambda: ZipVLCache(high_bits=4, low_bits=2)) if name.endswith(
            "ZipVLCache 4/2") else DynamicCache
        for n in contexts:
            ids = torch.randint(0, 1000, (1, n), device="cuda")
            held = {}

            def run():
                ctx = sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if how == "cudnn" else _null()
                cache = make_cache()
                with ctx, torch.no_grad():
                    if compiled is not None:
                        out = compiled(input_ids=ids, past_key_values=cache)
                        out = model.lm_head(out.last_hidden_state[:, -1:])
                    else:
                        out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits
                held["bytes"] = cache_bytes(cache)
                return out
            try:
                zipvl_compile.reset_stats()
                t, peak = timed(run, reps)
                paths = sorted({f"{r.path}: {r.reason}" if r.reason else r.path
                                for r in zipvl_compile.stats() if r.phase == "prefill"})
                rows.append(dict(shape=shape, context=n, variant=name, ttft_s=t,
                                 peak_gib=peak / 2**30, cache_gib=held["bytes"] / 2**30,
                                 sites=paths))
                if profile and how == "zipvl" and n == max(contexts):
                    print(f"--- profile: {name} at {n} tokens")
                    print(profile_table(run))
            except Exception as e:  # a failing variant is reported, the others still run
                rows.append(dict(shape=shape, context=n, variant=name, ttft_s=None,
                                 peak_gib=None, error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(rows[-1], flush=True)
        if how == "zipvl":
            zipvl_compile.helpers.uncompile_language_model(model)
    return rows


def cache_bytes(cache) -> int:
    """Bytes of device storage a cache holds (DynamicCache: its K/V tensors)."""
    if isinstance(cache, ZipVLCache):
        return cache.memory_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (layer.keys, layer.values) if t is not None)


def profile_table(run, top=30):
    """The ``top`` GPU kernels of one run by total device time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70)


def profile_steps(label, step, pos, wall_s, n=3):
    """Profiles ``n`` decode steps: GPU busy time and kernels per step, top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            step(pos + i)
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in gpu) / n / 1e3
    kernels = sum(e.count for e in gpu) / n
    print(f"--- profile {label}: wall {wall_s * 1e3:.2f} ms/step (median of the timed steps), "
          f"GPU busy {busy:.2f} ms/step, {kernels:.0f} kernels/step")
    print(events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=60))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _random_kv(B, Hkv, n, d, gen):
    k = torch.randn(B, Hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    return k, torch.randn_like(k)


def dense_cache(cfg, B, n, gen, max_len=None):
    """bf16 cache holding n random tokens: DynamicCache, or StaticCache of ``max_len``."""
    from transformers import DynamicCache, StaticCache

    cache = DynamicCache() if max_len is None else StaticCache(config=cfg, max_cache_len=max_len)
    d = cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        k, v = _random_kv(B, cfg.num_key_value_heads, n, d, gen)
        cache.update(k, v, i)
    return cache


def zipvl_cache(cfg, B, n, gen, high_bits, low_bits, max_len=None):
    """A ZipVLCache as the backend leaves it after a prefill keeping a random half (with
    ``max_len``: in the fixed buffers its first decode step moves it to)."""
    from zipvl_compile.cache import ZipVLLayer

    cache = ZipVLCache(high_bits=high_bits, low_bits=low_bits, max_cache_len=max_len)
    c = cache.config
    d = cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        k, v = _random_kv(B, cfg.num_key_value_heads, n, d, gen)
        perm = torch.stack([torch.randperm(n, device="cuda", generator=gen) for _ in range(B)])
        kept_idx = torch.cat([perm[:, :n // 2].sort(-1).values, perm[:, n // 2:].sort(-1).values],
                             dim=1)
        plan = kv_split.plan(n, kept_idx, torch.full((B,), n // 2, device="cuda"),
                             c.residual_length)
        split = kv_split.split_by_importance(k, v, plan, plan.counts.tolist(),
                                             high_bits=c.high_bits, low_bits=c.low_bits,
                                             group_size=c.group_size,
                                             vgroup=min(c.group_size, d))
        layer = ZipVLLayer(cache, i)
        layer.lazy_initialization(k, v)
        cache.layers.append(layer)
        if max_len is None:
            layer.install(split)
        else:
            cache.install_static(i, split.hi, split.lo, split.res_k, split.res_v, n,
                                 split.evicted)
        del split
        del k, v
    return cache


def cudagraph_skips() -> int:
    """Graphs Inductor compiled without CUDA graphs so far (with a logged reason)."""
    from torch._dynamo.utils import counters
    return counters["inductor"]["cudagraph_skips"]


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled so far in this process (first compiles and recompiles)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


# "ZipVLCache 16/16" is dense bf16 K/V read by the fused decode kernel (GQA without repeat_kv):
# a second dense baseline, faster than transformers' path where that expands K/V per query head.
CACHES = ("DynamicCache bf16", "ZipVLCache 16/16", "ZipVLCache 4/2", "ZipVLCache 4/0")
DENSE = ("bf16", "16/16")


def decode(shape, contexts, batches, steps, caches=CACHES, cuda_graphs=False, profile=False):
    """Rows of the decode table.  ``cuda_graphs``: static-shape caches (transformers'
    StaticCache for bf16, ZipVLCache(max_cache_len=...)) and mode="reduce-overhead".
    ``profile``: after timing a row, profile 3 more steps; prints the GPU busy time and kernel
    launches per step (against the wall time) and the top kernels."""
    model = build(shape)
    cfg = model.config
    zipvl_compile.compile_language_model(model, mode="reduce-overhead" if cuda_graphs else None)
    warm = 16  # decode steps before timing, at most
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for B in batches:
        for n in contexts:
            for name in caches:
                # each row compiles afresh, as a deployment with one cache type would (on the
                # H200 with torch 2.11, recompiling the 16/16 step graph for 4/2 failed in
                # Dynamo's fake-tensor tracing of the group quantization; not reproduced on CPU)
                torch._dynamo.reset()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    max_len = n + warm + steps + 1 if cuda_graphs else None
                    label = name.replace("DynamicCache", "StaticCache") if cuda_graphs else name
                    if name.startswith("Dynamic"):
                        cache = dense_cache(cfg, B, n, gen, max_len)
                    else:
                        hb, lb = map(int, name.split()[1].split("/"))
                        cache = zipvl_cache(cfg, B, n, gen, hb, lb, max_len)
                    held = cache_bytes(cache)
                    ids = torch.randint(0, 1000, (B, 1), device="cuda")

                    def step(pos):
                        with torch.no_grad():
                            out = model(input_ids=ids, past_key_values=cache,
                                        position_ids=torch.full((B, 1), pos, device="cuda"),
                                        logits_to_keep=1)
                        return out.logits.argmax(-1)

                    # warm-up until a step compiles nothing new (the first decode steps
                    # compile, the next recompile with a dynamic length; CUDA graphs record
                    # on a graph's second run: two more steps), then time each step
                    pos, quiet = n, 0
                    for _ in range(warm):
                        before = compiled_graphs()
                        ids = step(pos)
                        pos += 1
                        quiet = quiet + 1 if compiled_graphs() == before else 0
                        if quiet == (3 if cuda_graphs else 1):
                            break
                    graphs_before = compiled_graphs()
                    times = []
                    for _ in range(steps):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        ids = step(pos)
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                        pos += 1
                    dt = statistics.median(times)
                    if profile:
                        profile_steps(label, step, pos, dt)
                        pos += 3
                    rows.append(dict(shape=shape, batch=B, context=n, cache=label,
                                     cuda_graphs=cuda_graphs, tokens_per_s=B / dt,
                                     ms_per_step=1e3 * dt,
                                     cache_gib=held / 2**30,
                                     peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                                     compiled_graphs=compiled_graphs(),
                                     compiles_while_timed=compiled_graphs() - graphs_before,
                                     cudagraph_skips=cudagraph_skips()))
                except torch.cuda.OutOfMemoryError:
                    rows.append(dict(shape=shape, batch=B, context=n, cache=label,
                                     cuda_graphs=cuda_graphs, tokens_per_s=None,
                                     ms_per_step=None, cache_gib=None,
                                     peak_gib=None, note="out of memory"))
                print(rows[-1], flush=True)
                cache = None
    return rows


def decode_table(rows) -> str:
    """The decode table: tokens/s and ratios to transformers' bf16 cache and to the fastest
    dense row (bf16 or the fused kernel at 16/16) of the same batch and context."""
    from tabulate import tabulate

    base, fastest = {}, {}
    for r in rows:
        key = (r["batch"], r["context"])
        if r["cache"].endswith("bf16"):
            base[key] = r["tokens_per_s"]
        if r["cache"].endswith(DENSE) and r["tokens_per_s"]:
            fastest[key] = max(fastest.get(key, 0), r["tokens_per_s"])

    def vs(r, ref):
        b = ref.get((r["batch"], r["context"]))
        return "-" if not (r["tokens_per_s"] and b) else f"{r['tokens_per_s'] / b:.2f}x"
    return tabulate([[r["batch"], r["context"], r["cache"],
                      "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}",
                      vs(r, base), vs(r, fastest),
                      "-" if r["cache_gib"] is None else f"{r['cache_gib']:.2f}",
                      "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
                      r.get("compiled_graphs", "-"), r.get("compiles_while_timed", "-"),
                      r.get("cudagraph_skips", "-") if r.get("cuda_graphs") else "off"]
                     for r in rows],
                    headers=["batch", "context", "KV cache", "tokens/s", "vs bf16",
                             "vs fastest dense", "cache GiB", "peak GiB", "graphs",
                             "compiled while timed", "CUDA-graph skips"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["ttft", "stages", "decode"], required=True)
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen2-7b")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip", nargs="*", default=[],
                    help="skip TTFT variants whose name contains one of these words")
    ap.add_argument("--profile", action="store_true",
                    help="ttft/stages: profile the zipvl runs at the largest context; decode: "
                         "profile 3 steps of every row")
    ap.add_argument("--caches", nargs="+", default=list(CACHES), choices=CACHES,
                    help="decode: which caches to time")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="decode: static-shape caches (bf16: transformers StaticCache; ZipVLCache "
                         "with max_cache_len) under mode='reduce-overhead'")
    ap.add_argument("--json")
    args = ap.parse_args()
    from tabulate import tabulate

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"shape {args.shape}  (random weights: ZipVL ratios are forced)")
    if args.part in ("ttft", "stages"):
        variants = TTFT_VARIANTS if args.part == "ttft" else STAGE_VARIANTS
        rows = ttft(args.shape, args.contexts, args.reps, variants, args.skip, args.profile)
        base = {r["context"]: r["ttft_s"] for r in rows if "default" in r["variant"]}

        def vs(r, fmt):
            b = base.get(r["context"])
            return "-" if r["ttft_s"] is None or not b else fmt(b, r["ttft_s"])
        print(tabulate([[r["context"], r["variant"],
                         "failed" if r["ttft_s"] is None else f"{r['ttft_s']:.3f}",
                         vs(r, lambda b, t: f"{b / t:.2f}x"),
                         vs(r, lambda b, t: f"{100 * (t - b) / b:+.1f}%"),
                         "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
                         "-" if r.get("cache_gib") is None else f"{r['cache_gib']:.2f}"]
                        for r in rows],
                       headers=["context", "prefill", "TTFT s", "speedup", "time vs default",
                                "peak GiB", "cache GiB"]))
    else:
        rows = decode(args.shape, args.contexts, args.batches, args.steps, args.caches,
                      args.cuda_graphs, args.profile)
        print(decode_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
