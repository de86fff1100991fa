"""How many keys does each query of the toy VLM really read?

    python benchmarks/toyvlm_row_sparsity.py [--weights W] [--n 64] [--top-p 0.99 0.9 0.75 0.5]

Runs the toy VLM's training forward (image and [BOS, QTYPE, COLOUR, ANS] in the model's layout,
the answer read at ANS) with *top-p attention* from layer 1 on: each query row keeps only its
smallest set of keys holding a fraction ``p`` of its softmax mass, renormalized
(``top_p_attention``, plugged in through transformers' ``AttentionInterface``; no model code is
patched).  Prints per level: accuracy, the mean number of keys a row reads (image rows and the
question's rows QTYPE, COLOUR, ANS apart), and the fraction of keys that at least one row reads
(the union ZipVL's one kept set per layer must cover).  Layer 0 stays dense, as in the harness
(``dense_layers=1``).  CPU, a few minutes at n = 128.
"""
from __future__ import annotations

import argparse

import torch
from tabulate import tabulate
from transformers import AttentionInterface
from transformers.models.llama.modeling_llama import repeat_kv

from zipvl_compile.eval import EVAL_SEED, load_toyvlm
from zipvl_compile.toyvlm import task


def top_p_attention(q, k, v, scaling, top_p):
    """Causal attention of q [B, H, n, d] over k, v [B, Hkv, n, d] (no padding, no cache) in
    which each row keeps its smallest set of keys holding ``top_p`` of its softmax mass, ties
    to the lower key position; ``top_p`` None: plain causal attention.  Returns (out
    [B, H, n, d] in q's dtype, probs [B, H, n, n] fp32, rows sum to 1)."""
    g = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, g), repeat_kv(v, g)
    n = q.shape[-2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    logits = (q.float() @ k.float().transpose(-1, -2) * scaling).masked_fill(~causal,
                                                                           float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None:
        ranked, order = probs.sort(dim=-1, descending=True, stable=True)
        before = ranked.cumsum(dim=-1) - ranked           # mass ranked above each key
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < top_p)
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return (probs @ v.float()).to(q.dtype), probs


class RowSparsity:
    """An attention function: ``top_p_attention`` from layer ``first_layer`` on (plain causal
    attention before); ``weights`` holds the probs [B, H, n, n] of those layers, in order."""

    def __init__(self, first_layer: int = 1):
        self.first_layer, self.top_p, self.weights = first_layer, None, []

    def __call__(self, module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
        if q.shape[-2] != k.shape[-2]:
            raise ValueError("row sparsity runs the training forward: no cache")
        top_p = self.top_p if module.layer_idx >= self.first_layer else None
        out, probs = top_p_attention(q, k, v, scaling, top_p)
        if module.layer_idx >= self.first_layer:
            self.weights.append(probs)
        return out.transpose(1, 2).contiguous(), None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=None, help="toy VLM safetensors (default: shipped)")
    ap.add_argument("--n", type=int, default=64, help="held-out samples per level")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--top-p", type=float, nargs="+", default=[1.0, 0.99, 0.9, 0.75, 0.5])
    args = ap.parse_args()
    model, _ = load_toyvlm(args.weights)
    model.eval()
    grid, bos_first = model.config.grid, model.config.bos_first
    attention = RowSparsity(first_layer=1)
    AttentionInterface.register("zipvl_row_sparsity", attention)
    model.language_model.config._attn_implementation = "zipvl_row_sparsity"
    patches = grid * grid
    n = patches + 4                                  # image + BOS QTYPE COLOUR ANS
    first = int(bos_first)                           # the image's first position
    image_rows = torch.zeros(n, dtype=torch.bool)
    image_rows[first:first + patches] = True
    question_rows = torch.zeros(n, dtype=torch.bool)  # QTYPE, COLOUR, ANS (BOS reads itself)
    question_rows[-3:] = True
    rows = []
    for p in args.top_p:
        attention.top_p = None if p >= 1.0 else p
        row = [f"{p:g}"]
        for lv, _ in enumerate(task.LEVELS):
            b = task.sample(args.n, grid, EVAL_SEED + lv, levels=(lv,))
            hits, per_row, union = 0, [], []
            for i in range(0, args.n, args.batch):
                attention.weights = []
                with torch.no_grad():
                    logits = model(b.pixels[i:i + args.batch], b.text[i:i + args.batch])[:, 1]
                hits += (logits.argmax(-1) == b.answer[i:i + args.batch]).sum().item()
                for w in attention.weights:                            # [B, H, n, n]
                    reads = w > 0
                    per_row.append(reads.sum(-1).float())             # [B, H, n]
                    union.append(reads.any(dim=(1, 2)).float().mean(-1))
            per_row, union = torch.cat(per_row), torch.cat(union)
            row += [f"{100 * hits / args.n:.1f}", f"{per_row[..., image_rows].mean():.1f}",
                    f"{per_row[..., question_rows].mean():.1f}", f"{union.mean():.2f}"]
        rows.append(row)
    headers = ["top-p"] + [f"{lv} {h}" for lv in task.LEVELS
                           for h in ("acc %", "keys/image row", "keys/question row", "union")]
    print(f"toy VLM, layers 1-{model.config.layers - 1} top-p per row (layer 0 dense), "
          f"{args.n} held-out samples per level, {n} tokens")
    print(tabulate(rows, headers=headers))


if __name__ == "__main__":
    main()
