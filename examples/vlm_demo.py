"""Demo: ZipVL on the shipped toy VLM (no downloads), and on random-weight transformers VLMs.

    python examples/vlm_demo.py                  # the toy VLM (default)
    python examples/vlm_demo.py --transformers   # also tiny random-weight Qwen2-VL and LLaVA

The toy VLM (``zipvl_compile/toyvlm``: patch encoder + projector + a transformers Llama decoder,
trained in this repo) answers generated questions about 24 x 24-patch images (576 visual
tokens): *find* the glyph of the one patch of a colour (easy), *count* the patches of a colour
(2-4 medium, 5-9 hard).  It answers them dense, with the zipvl backend (adaptive budget,
tau=0.975; layer 0 dense, ``dense_layers=1``: the toy's first layer reads the whole image), and
with the zipvl backend plus the mixed-precision KV cache (4-bit kept tokens, 2-bit others), and
prints accuracy, per-layer kept ratios and the cache's memory.  Expect a few
minutes of compilation on a laptop CPU.  ``python -m zipvl_compile.eval`` is the full harness.
"""
import argparse

import torch

import zipvl_compile
from zipvl_compile import eval as harness
from zipvl_compile.toyvlm import task


def toy_vlm(n: int):
    model, meta = harness.load_toyvlm()
    grid = model.config.grid
    hard = task.sample(n, grid, harness.EVAL_SEED + 2, levels=(2,))  # what evaluate() draws
    colour = task.COLOUR_NAMES[int(hard.text[0, 2]) - task.COLOUR0]
    print(f"=== toy VLM: {grid}x{grid} patches ({grid * grid} visual tokens), "
          f"{n} held-out questions per level")
    print(f"trained with: {meta['command']}\n")
    sparse = dict(tau=0.975, **harness.TOY_PROBES)  # probe counts scaled to ~580 tokens
    settings = [harness.Setting("dense"), harness.Setting("zipvl tau=0.975", sparse),
                harness.Setting("zipvl tau=0.975 + ZipVLCache 4/2", sparse, (4, 2))]
    data = harness.ToyQuestions(model, n=n, grid=grid)
    results = []
    with torch.no_grad():
        for s in settings:
            results += harness.evaluate(data, s, batch=n, cache_sizes=harness.TOY_CACHE)
    answers = ", ".join(f"{r.setting}: {r.predicted[0] - task.DIGIT0}" for r in results
                        if r.level == "hard")
    print(f"first hard question: how many {colour} patches?  "
          f"truth {int(hard.answer[0]) - task.DIGIT0}; {answers}")
    print("\naccuracy, mean kept ratio, KV = bytes the cache holds / a 16-bit cache of the same "
          "tokens\n" + harness.table(results))
    print("\nkept ratio per layer")
    print(harness.layer_table(results))
    return results


def transformers_models():
    from zipvl_compile import tiny_models as models

    for name, build in (("Qwen2-VL", models.qwen2_vl), ("LLaVA", models.llava)):
        print(f"\n=== {name} (random weights, {build()[1]['input_ids'].shape[1]} prompt tokens)")
        for label, fields in (("tau=1.0", dict(tau=1.0)), ("ratio=0.5", dict(ratio=0.5,
                              recent_probes=4, random_probes=4, keep_recent=2))):
            model, inputs = build()
            with torch.no_grad():
                dense = model.generate(**inputs, max_new_tokens=8, do_sample=False)
                zipvl_compile.reset_stats()
                zipvl_compile.compile_language_model(model, **fields)
                sparse = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            n = inputs["input_ids"].shape[1]
            print(f"\n[{label}] dense tokens  {dense[0, n:].tolist()}\n"
                  f"[{label}] zipvl tokens  {sparse[0, n:].tolist()}  "
                  f"(identical: {torch.equal(dense, sparse)})")
            print(zipvl_compile.format_stats())
        with torch.no_grad():
            zipvl_compile.reset_stats()
            cache = zipvl_compile.ZipVLCache(high_bits=4, low_bits=2, group_size=16,
                                             residual_length=4)
            mixed = model.generate(**inputs, max_new_tokens=8, do_sample=False,
                                   **zipvl_compile.helpers.cache_kwarg(model, cache))
        print(f"\n[ratio=0.5 + ZipVLCache 4/2] tokens {mixed[0, n:].tolist()}; cache holds "
              f"{cache.memory_bytes()} bytes; a 16-bit cache of the same tokens: "
              f"{cache.dense_bytes()} bytes (on a prompt this short the group padding and the "
              f"residual window dominate)")
        print(zipvl_compile.format_stats())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32, help="questions per difficulty level")
    ap.add_argument("--transformers", action="store_true",
                    help="also run tiny random-weight Qwen2-VL and LLaVA through generate()")
    args = ap.parse_args(argv)
    results = toy_vlm(args.n)
    if args.transformers:
        transformers_models()
    return results


if __name__ == "__main__":
    main()
