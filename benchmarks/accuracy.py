"""Accuracy of the toy VLM under dense attention, ZipVL adaptive (several tau) and fixed-ratio
ZipVL at the adaptive runs' average kept ratio, per difficulty level (first version of issue 5's
harness: the shipped-model default, user checkpoints, KV-cache settings and plots are not here
yet).

    python benchmarks/accuracy.py --weights toyvlm.safetensors [--n 256] [--taus 0.95 0.975 0.99]

Probe settings are scaled to the toy prompt length (``--recent-probes`` etc.).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, ".")
import zipvl_compile  # noqa: E402
from zipvl_compile.toyvlm import task  # noqa: E402
from zipvl_compile.toyvlm.model import ToyVLM, ToyVLMConfig  # noqa: E402


def load(path: str) -> ToyVLM:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    model = ToyVLM(ToyVLMConfig(**json.loads(meta["config"])))
    model.load_state_dict(load_file(path))
    return model.eval()


def evaluate(model, n, seed, **fields):
    """Accuracy and mean kept ratio per level; dense when ``fields`` is empty."""
    torch._dynamo.reset()
    model.language_model._compiled_call_impl = None
    if fields:
        zipvl_compile.compile_language_model(model, **fields)
    out = {}
    for lv, name in enumerate(task.LEVELS):
        b = task.sample(n, model.config.grid, seed + lv, levels=(lv,))
        zipvl_compile.reset_stats()
        logits = model.answer(b.pixels, b.text)
        acc = (logits.argmax(-1) == b.answer).float().mean().item()
        ratios = [r.kept_ratio for r in zipvl_compile.stats()
                  if r.phase == "prefill" and r.kept_ratio is not None]
        out[name] = (acc, sum(ratios) / len(ratios) if ratios else 1.0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=10 ** 9)
    ap.add_argument("--taus", type=float, nargs="+", default=[0.95, 0.975, 0.99])
    ap.add_argument("--recent-probes", type=int, default=8)
    ap.add_argument("--random-probes", type=int, default=16)
    ap.add_argument("--keep-recent", type=int, default=4)
    args = ap.parse_args()
    from tabulate import tabulate

    model = load(args.weights)
    probes = dict(recent_probes=args.recent_probes, random_probes=args.random_probes,
                  keep_recent=args.keep_recent)
    rows = [("dense", evaluate(model, args.n, args.seed))]
    for tau in args.taus:
        adaptive = evaluate(model, args.n, args.seed, tau=tau, **probes)
        rows.append((f"zipvl tau={tau}", adaptive))
        mean = sum(r for _, r in adaptive.values()) / len(adaptive)
        rows.append((f"fixed ratio {mean:.3f}",
                     evaluate(model, args.n, args.seed, ratio=mean, **probes)))
    print(tabulate([[name] + [f"{res[lv][0]:.3f} ({res[lv][1]:.2f})" for lv in task.LEVELS]
                    for name, res in rows],
                   headers=["setting"] + [f"{lv}: acc (kept)" for lv in task.LEVELS]))


if __name__ == "__main__":
    main()
