"""Which layer's sparse prefill costs the toy VLM its accuracy?

    python benchmarks/toyvlm_layer_sparsity.py --weights W [--n 32] [--all-queries]

Runs the toy VLM with the *reference* ZipVL attention (``zipvl_compile.reference``, the
harness's toy probe sizes, tau) in one layer at a time, the other layers dense, then in every
layer, and prints per difficulty level: accuracy, the fraction of the relevant patches (those
the answer depends on) that the sparse layers kept, and their mean kept ratio.  The reference
attention is plugged in through transformers' ``AttentionInterface`` (a registered attention
function; no model code is patched).  CPU, a minute or two per model at n = 32.
"""
from __future__ import annotations

import argparse

import torch
from tabulate import tabulate
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from zipvl_compile import ZipVLConfig, reference
from zipvl_compile.eval import EVAL_SEED, TOY_PROBES, load_toyvlm
from zipvl_compile.toyvlm import task


class LayerSparsity:
    """An attention function: reference ZipVL in ``layers`` (prefill only), SDPA elsewhere;
    keeps the selections of the last forward in ``kept`` as (layer, [kept index tensors])."""

    def __init__(self, config: ZipVLConfig):
        self.config, self.layers, self.kept = config, set(), []

    def __call__(self, module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
        if module.layer_idx in self.layers and q.shape[-2] > 1:
            out, sels = reference.zipvl_attention(q, k, v, self.config, scale=scaling,
                                                  salt=module.layer_idx)
            self.kept.append((module.layer_idx, [s.kept for s in sels]))
            return out.transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(module, q, k, v, attention_mask, scaling=scaling,
                                      dropout=dropout, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=None, help="toy VLM safetensors (default: shipped)")
    ap.add_argument("--n", type=int, default=32, help="held-out samples per level")
    ap.add_argument("--tau", type=float, default=0.975)
    ap.add_argument("--all-queries", action="store_true", help="sparse_queries=False")
    args = ap.parse_args()
    model, _ = load_toyvlm(args.weights)
    grid, offset = model.config.grid, int(model.config.bos_first)
    attention = LayerSparsity(ZipVLConfig(tau=args.tau, sparse_queries=not args.all_queries,
                                          **TOY_PROBES))
    AttentionInterface.register("zipvl_layer_sparsity", attention)
    model.language_model.set_attn_implementation("zipvl_layer_sparsity")
    n_layers = model.config.layers
    rows = []
    for layers in [{i} for i in range(n_layers)] + [set(range(1, n_layers)), set(range(n_layers))]:
        attention.layers = layers
        row = [",".join(map(str, sorted(layers)))]
        for lv, name in enumerate(task.LEVELS):
            b = task.sample(args.n, grid, EVAL_SEED + lv, levels=(lv,))
            attention.kept = []
            with torch.no_grad():
                acc = (model.answer(b.pixels, b.text).argmax(-1) == b.answer).float().mean()
            n_tokens = grid * grid + 3
            relevant, ratio = [], []
            for _, kept in attention.kept:
                for i, idx in enumerate(kept):
                    mask = torch.zeros(n_tokens, dtype=torch.bool)
                    mask[idx] = True
                    relevant.append(mask[offset:offset + grid * grid][b.relevant[i]].float().mean())
                    ratio.append(len(idx) / n_tokens)
            row += [f"{100 * acc:.0f}", f"{torch.stack(relevant).mean():.2f}",
                    f"{sum(ratio) / len(ratio):.2f}"]
        rows.append(row)
    headers = ["sparse layers"] + [f"{lv} {h}" for lv in task.LEVELS
                                   for h in ("acc %", "relevant kept", "kept ratio")]
    print(f"tau={args.tau} sparse_queries={not args.all_queries} n={args.n} per level")
    print(tabulate(rows, headers=headers))


if __name__ == "__main__":
    main()
