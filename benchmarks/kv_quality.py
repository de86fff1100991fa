"""Accuracy of the mixed-precision KV cache against full precision, and against transformers'
``QuantizedCache`` (quanto backend) on the same inputs (issue 3's quality table).  CPU, fp32.

Part A, one attention layer (Qwen2-7B heads: 28 query, 4 KV, head dim 128, bf16), a 4096-token
prompt with the structure ZipVL relies on: a few hundred heavy-hitter keys that decode queries
attend to, and outlier key channels.  Importance comes from ZipVL's own prefill selection
(``reference.zipvl_attention``, ratio 0.5: half important, the issue's memory setting); the
cache split is built from it exactly as the backend hands it over.  Error: relative L2 error of
32 decode queries' attention outputs.

Part B, a random-weight Llama language model (4 layers, head dim 64, bf16) compiled with the
zipvl backend (all queries computed), once at ZipVL's default adaptive budget (tau=0.975) and
once at a forced ratio 0.5 (random weights have no attention sparsity: the half kept important
is arbitrary), a 1024-token prompt: relative error of the next-token logits of 8 decoded tokens vs
``DynamicCache`` on the same model (quanto's cache runs on an eager copy: it does not compile).

Part C, the shipped toy VLM (``zipvl_compile.toyvlm``: trained, its attention concentrated,
issue 5): answer accuracy, agreement with the full-precision cache's answer, relative error of
the answer logits and memory, per difficulty level, ours (sparse prefill at tau=0.975 handing
its importance to the cache) against quanto (dense prefill), each against its own prefill with
``DynamicCache``.

    python benchmarks/kv_quality.py [--json results.json] [--skip-model] [--skip-toy]

Memory is the bytes each cache holds (ours: ``memory_bytes()``; quanto: codes, scales,
shifts and its residual), relative to the 16-bit cache of the same tokens.  Parts A and B also
run ours at quanto's memory (rows "g128 r0": ``MATCHED``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from zipvl_compile import ZipVLCache, ZipVLConfig, reference  # noqa: E402

OURS = [(16, 16), (8, 8), (8, 4), (4, 4), (4, 2), (4, 0), (2, 2), (2, 0)]
QUANTO = [4, 2]
GROUP = 64       # quanto's default group; ours uses it too (same groups, same residual)
RESIDUAL = 128
# Ours again at the memory quanto holds: ``ZipVLConfig``'s default key groups (128 tokens; the
# slot positions ours stores cost what the scales of the halved key groups save) and no prompt
# token in the residual window (quanto's cache quantizes the whole prompt; decoded tokens still
# enter the window).  Rows "zipvl a/b, g128 r0".
MATCHED = dict(group_size=128, residual_length=0)


def our_sizes(part_sizes: dict) -> dict:
    """Row-name suffix -> our cache sizes: a part's own, then ``MATCHED``."""
    return {"": part_sizes, ", g128 r0": MATCHED}


def quanto_layer(nbits):
    from transformers.cache_utils import QuantoQuantizedLayer

    return QuantoQuantizedLayer(nbits=nbits, axis_key=0, axis_value=0, q_group_size=GROUP,
                                residual_length=RESIDUAL)


def _storage_bytes(t) -> int:
    """Bytes of a tensor or of the inner tensors of a (nested) quanto tensor subclass."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(_storage_bytes(getattr(t, n)) for n in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def quanto_bytes(layer) -> int:
    parts = (layer._quantized_keys, layer._quantized_values, layer.keys, layer.values)
    return sum(_storage_bytes(t) for t in parts)


def planted_layer(n=4096, H=28, Hkv=4, d=128, heavy=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, Hkv, n, d, generator=g)
    v = torch.randn(1, Hkv, n, d, generator=g)
    k[..., :4] = k[..., :4] * 8 + 6  # outlier channels
    u = F.normalize(torch.randn(d, generator=g), dim=0)
    idx = torch.randperm(n - 64, generator=g)[:heavy]
    k[:, :, idx] += 8 * u
    q = torch.randn(1, H, n, d, generator=g) + 2.5 * u
    q_dec = torch.randn(1, H, 32, d, generator=g) + 2.5 * u
    k_dec = torch.randn(1, Hkv, 32, d, generator=g)
    v_dec = torch.randn(1, Hkv, 32, d, generator=g)
    return tuple(x.bfloat16() for x in (q, k, v, q_dec, k_dec, v_dec))


def attention(q, k, v):
    """fp32 reference attention (inputs are bf16)."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)


def part_a():
    q, k, v, q_dec, k_dec, v_dec = planted_layer()
    n, d = k.shape[2], k.shape[3]
    cfg = ZipVLConfig(ratio=0.5)  # half important: the setting of the memory targets
    _, sels = reference.zipvl_attention(q, k, v, cfg)
    kept = sels[0].kept
    budget = torch.tensor([len(kept)])
    rest = torch.tensor(sorted(set(range(n)) - set(kept.tolist())), dtype=torch.long)
    kept_idx = torch.cat([kept.sort().values, rest])[None]
    dense_bytes = 2 * k.numel() * 2 * (n + 32) // n  # K and V of n + 32 tokens, bf16
    rows = []
    # residual 32: quanto quantizes the whole prompt, so ours keeps few prompt tokens
    # unquantized too (near equal memory footing)
    settings = our_sizes(dict(group_size=GROUP, residual_length=32))
    for (suffix, sizes), (hb, lb) in itertools.product(settings.items(), OURS):
        cache = ZipVLCache(high_bits=hb, low_bits=lb, **sizes)
        cache.update(k, v, 0)
        plan = cache.plan(0, k, kept_idx, budget)
        cache.adopt(0, k, v, plan, plan.counts.tolist(), "layers.0.self_attn")
        errs = []
        full_k, full_v = k, v
        for t in range(32):
            cache.layers[0].append(k_dec[:, :, t:t + 1], v_dec[:, :, t:t + 1])
            full_k = torch.cat([full_k, k_dec[:, :, t:t + 1]], 2)
            full_v = torch.cat([full_v, v_dec[:, :, t:t + 1]], 2)
            qt = q_dec[:, :, t:t + 1]
            out = torch.ops.zipvl.decode_attention(qt, None, d ** -0.5,
                                                   *cache.layers[0].kernel_args()).float()
            ref = attention(qt, full_k, full_v)
            errs.append(((out - ref).norm() / ref.norm()).item())
        rows.append(dict(cache=f"zipvl {hb}/{lb}{suffix}", kept=len(kept) / n,
                         memory=cache.memory_bytes() / dense_bytes,
                         attn_err=sum(errs) / len(errs)))
    for bits in QUANTO:
        layer = quanto_layer(bits)
        layer.update(k, v)
        errs = []
        full_k, full_v = k, v
        for t in range(32):
            kk, vv = layer.update(k_dec[:, :, t:t + 1], v_dec[:, :, t:t + 1])
            full_k = torch.cat([full_k, k_dec[:, :, t:t + 1]], 2)
            full_v = torch.cat([full_v, v_dec[:, :, t:t + 1]], 2)
            qt = q_dec[:, :, t:t + 1]
            ref = attention(qt, full_k, full_v)
            errs.append(((attention(qt, kk, vv) - ref).norm() / ref.norm()).item())
        rows.append(dict(cache=f"quanto {bits}-bit", kept=None,
                         memory=quanto_bytes(layer) / dense_bytes,
                         attn_err=sum(errs) / len(errs)))
    return rows


# Part B's prefill selections: ZipVL's default adaptive budget, and half of every layer forced
# important (the memory setting; on random weights nothing is more important than
# anything else, so the forced half is an arbitrary one).
PART_B_SELECTIONS = {"tau=0.975": dict(tau=0.975), "ratio 0.5": dict(ratio=0.5)}


def prefill_kept_ratio() -> float:
    """Mean kept fraction over the sparse prefill sites of the last forward (``stats()``)."""
    import zipvl_compile

    kept = [r.kept_ratio for r in zipvl_compile.stats()
            if r.phase == "prefill" and r.kept_ratio is not None]
    return sum(kept) / len(kept)


def part_b(selection: dict):
    """Rows for one prefill selection (``PART_B_SELECTIONS``) and the prefill's kept fraction."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, QuantizedCache

    import zipvl_compile

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    eager = LlamaForCausalLM(cfg).eval().bfloat16()  # quanto's cache does not compile
    model = LlamaForCausalLM(cfg).eval().bfloat16()
    model.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 512, (1, 1024), generator=torch.Generator().manual_seed(1))
    # sparse_queries=False: every prompt token's hidden state is computed (with sparse queries
    # the skipped rows are zero and the next layers' K/V of those tokens are far out of
    # distribution, which per-channel key groups then share with the kept tokens)
    zipvl_compile.compile_language_model(model, sparse_queries=False, **selection)

    def logits_after(m, cache):
        out = m.generate(input_ids=ids, max_new_tokens=8, do_sample=False,
                         past_key_values=cache, output_logits=True,
                         return_dict_in_generate=True)
        return torch.stack(out.logits).float(), cache

    def err(x, ref):
        return dict(logit_err=((x - ref).norm() / ref.norm()).item(),
                    same_tokens=bool((x.argmax(-1) == ref.argmax(-1)).all()))

    # each cache against full precision on the same model: ours on the compiled model (sparse
    # prefill), quanto on the eager one (dense prefill)
    ref_z, dense = logits_after(model, DynamicCache())
    kept = prefill_kept_ratio()
    ref_e, _ = logits_after(eager, DynamicCache())
    dense_bytes = sum(layer.keys.numel() * 2 * 2 for layer in dense.layers)
    rows = []
    settings = our_sizes(dict(group_size=GROUP, residual_length=RESIDUAL))
    for (suffix, sizes), (hb, lb) in itertools.product(settings.items(), OURS):
        lg, cache = logits_after(model, ZipVLCache(high_bits=hb, low_bits=lb, **sizes))
        rows.append(dict(cache=f"zipvl {hb}/{lb}{suffix}",
                         memory=cache.memory_bytes() / dense_bytes, **err(lg, ref_z)))
    for bits in QUANTO:
        q = QuantizedCache(backend="quanto", config=eager.config, nbits=bits, q_group_size=GROUP,
                           residual_length=RESIDUAL)
        lg, cache = logits_after(eager, q)
        mem = sum(quanto_bytes(layer) for layer in cache.layers)
        rows.append(dict(cache=f"quanto {bits}-bit", memory=mem / dense_bytes, **err(lg, ref_e)))
    return rows, kept


def part_c(n: int):
    """The shipped toy VLM (trained, attention concentrated: issue 5), ``n`` held-out questions
    per level; the answer is one decode step reading the cache.  Ours: the zipvl backend at
    tau=0.975 with the toy's probe and cache sizes (``eval.TOY_PROBES``, ``eval.TOY_CACHE``),
    against the same sparse prefill with ``DynamicCache``; quanto (same group and residual
    sizes) on the eager model, against the eager model with ``DynamicCache``."""
    from transformers import DynamicCache, QuantizedCache

    from zipvl_compile import eval as ev
    from zipvl_compile.helpers import compile_language_model, uncompile_language_model

    model, _ = ev.load_toyvlm()
    data = ev.ToyQuestions(model, n=n, grid=model.config.grid)
    sizes = ev.TOY_CACHE

    def answers(make_cache):
        """Per level: (answer logits [n, vocab], correct answers, bytes a quantized cache held,
        bytes a 16-bit cache of the same tokens holds (for DynamicCache))."""
        out = {}
        for level in data.levels:
            logits, correct, held, dense = [], 0, 0, 0
            for pixels, text, answer in data.batches(level, 64):
                cache = make_cache()
                lg = model.answer(pixels, text, cache).float()
                logits.append(lg)
                correct += int((lg.argmax(-1) == answer).sum())
                if isinstance(cache, ZipVLCache):
                    held += cache.memory_bytes()
                elif isinstance(cache, QuantizedCache):
                    held += sum(quanto_bytes(layer) for layer in cache.layers)
                else:
                    dense += sum(layer.keys.numel() * 2 * 2 for layer in cache.layers)
            out[level] = (torch.cat(logits), correct, held, dense)
        return out

    def row(name, got, ref):
        r = dict(cache=name)
        for level, (lg, correct, held, _) in got.items():
            ref_lg, _, _, ref_dense = ref[level]
            r[level] = dict(accuracy=correct / len(lg),
                            agreement=float((lg.argmax(-1) == ref_lg.argmax(-1)).float().mean()),
                            logit_err=((lg - ref_lg).norm() / ref_lg.norm()).item(),
                            memory=held / ref_dense if held else None)
        return r

    rows = []
    with torch.no_grad():
        eager_ref = answers(DynamicCache)
        rows.append(row("dense prefill, DynamicCache", eager_ref, eager_ref))
        for bits in QUANTO:
            got = answers(lambda: QuantizedCache(backend="quanto", config=model.language_model
                                                 .config, nbits=bits,
                                                 q_group_size=sizes["group_size"],
                                                 residual_length=sizes["residual_length"]))
            rows.append(row(f"dense prefill, quanto {bits}-bit", got, eager_ref))
        torch._dynamo.reset()
        compile_language_model(model, inductor=False, tau=0.975, **ev.TOY_PROBES)
        try:
            sparse_ref = answers(DynamicCache)
            rows.append(row("zipvl tau=0.975, DynamicCache", sparse_ref, sparse_ref))
            for hb, lb in OURS:
                got = answers(lambda: ZipVLCache(high_bits=hb, low_bits=lb, **sizes))
                rows.append(row(f"zipvl tau=0.975, cache {hb}/{lb}", got, sparse_ref))
        finally:
            uncompile_language_model(model)
    return rows, data.levels


def toy_cell(m: dict) -> str:
    """One level of a part-C row: accuracy % / agreement % / logit error / memory."""
    memory = "-" if m["memory"] is None else f"{100 * m['memory']:.0f}%"
    return (f"{100 * m['accuracy']:.1f} / {100 * m['agreement']:.1f} / "
            f"{m['logit_err']:.3f} / {memory}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--skip-toy", action="store_true")
    ap.add_argument("--toy-n", type=int, default=128, help="questions per level (part C)")
    args = ap.parse_args()
    from tabulate import tabulate

    a = part_a()
    print("Part A: one attention layer, planted heavy hitters + outlier key channels, "
          f"ZipVL selection kept {a[0]['kept']:.3f} of the prompt")
    print(tabulate([[r["cache"], f"{100 * r['memory']:.1f}%", f"{r['attn_err']:.4f}"] for r in a],
                   headers=["cache", "memory vs 16-bit", "decode attention rel. error"]))
    b = {}
    for name, selection in ({} if args.skip_model else PART_B_SELECTIONS).items():
        rows, kept = part_b(selection)
        b[name] = dict(rows=rows, kept=kept)
        print(f"\nPart B: random-weight Llama (4 layers, bf16), 1024-token prompt, {name} "
              f"(prefill kept {kept:.3f}; all queries), 8 decoded tokens")
        print(tabulate([[r["cache"], f"{100 * r['memory']:.1f}%", f"{r['logit_err']:.4f}",
                         r["same_tokens"]] for r in rows],
                       headers=["cache", "memory vs 16-bit", "next-token logit rel. error",
                                "same greedy tokens"]))
    c, levels = ([], []) if args.skip_toy else part_c(args.toy_n)
    if c:
        print(f"\nPart C: the shipped toy VLM (trained, fp32), {args.toy_n} held-out questions "
              "per level, one decode step reading the cache; agreement and logit error against "
              "the same prefill with DynamicCache; memory: bytes held / a 16-bit cache's")
        print(tabulate([[r["cache"]] + [toy_cell(r[lv]) for lv in levels] for r in c],
                       headers=["cache"] + [f"{lv}: acc % / agree % / logit err / memory"
                                            for lv in levels]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(part_a=a, part_b=b, part_c=c), f, indent=1)


if __name__ == "__main__":
    main()
