"""PNG of ``benchmarks/end_to_end.py`` results: TTFT and decode throughput against context length.

    python benchmarks/plot_end_to_end.py \\
        --ttft benchmarks/results/end_to_end_ttft_realize_mask_h100.json \\
        --decode benchmarks/results/end_to_end_decode_cudagraphs_b1_h100.json \\
        --out benchmarks/results/end_to_end_h100.png

Reads the ``--json`` files the benchmark writes (several ``--decode`` files are merged; rows of
one batch size are plotted, ``--batch``).  Plots only measured rows; a row without a value
(out of memory) is left out and listed in the legend as such.
"""
from __future__ import annotations

import argparse
import json


def _series(rows, key, value):
    """{series name: sorted [(context, value)]} over rows with a value."""
    out: dict[str, list] = {}
    for r in rows:
        out.setdefault(r[key], [])
        if r.get(value) is not None:
            out[r[key]].append((r["context"], r[value]))
    return {k: sorted(v) for k, v in out.items()}


def plot(ttft_rows, decode_rows, batch, out, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts in _series(ttft_rows, "variant", "ttft_s").items():
        if pts:
            left.plot(*zip(*pts), marker="o", label=name)
    left.set(xscale="log", xlabel="prompt tokens", ylabel="TTFT (s)",
             title="time to first token (batch 1)")
    rows = [r for r in decode_rows if r["batch"] == batch]
    for name, pts in _series(rows, "cache", "tokens_per_s").items():
        label = name if pts else f"{name} (out of memory)"
        if pts:
            right.plot(*zip(*pts), marker="o", label=label)
    right.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="tokens/s",
              title=f"decode throughput (batch {batch})")
    for ax in (left, right):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ttft", required=True, help="JSON of --part ttft")
    ap.add_argument("--decode", nargs="+", required=True, help="JSON files of --part decode")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    with open(args.ttft) as f:
        ttft = json.load(f)
    decode = []
    for path in args.decode:
        with open(path) as f:
            decode += json.load(f)["rows"]
    title = (f"{ttft.get('device', '?')}, torch {ttft.get('torch', '?')}; Qwen2-7B shape, "
             "random weights, ZipVL ratios forced")
    plot(ttft["rows"], decode, args.batch, args.out, title)
    print("plot:", args.out)


if __name__ == "__main__":
    main()
