"""Accuracy harness: dense vs ZipVL (adaptive, fixed ratio) vs ZipVLCache bit settings.

    python -m zipvl_compile.eval                       # the shipped toy VLM, held-out data
    python -m zipvl_compile.eval --weights my.safetensors --n 512 --plot acc.png
    python -m zipvl_compile.eval --model CHECKPOINT --questions q.jsonl   # real weights

A checkpoint (``transformers`` hub id or folder, e.g. Qwen2-VL or LLaVA-OneVision) answers an
image-question file by greedy generation; the file format and the answer-matching rule are in
``eval_hf.py``.

Settings (each evaluated per level: the toy task's difficulty levels, or the file's ``level``):

- ``dense``: the model as is (eager, ``DynamicCache``).
- ``zipvl tau=T``: the zipvl backend with the adaptive budget at each ``--taus`` value.
- ``fixed ratio R``: the same backend with ``ratio=R``, R = the mean kept ratio (over levels) of
  the adaptive run just before it: the paper's comparison with a fixed budget.  With
  ``--dense-layers N`` both keep the first N layers dense (kept ratio 1 in the tables) and R
  is the adaptive mean over the other layers.
- ``zipvl tau=0.975 + cache H/L``: adaptive prefill handing its selection to a ``ZipVLCache``
  with ``H``-bit important and ``L``-bit other tokens (``--caches``).

Accuracies come with 95% Wilson intervals (a second table, and in ``--json``): with ``n``
questions per level, one question moves an accuracy by 100/n points.

Probe counts and the cache's group/residual sizes are scaled to the toy prompt length (a few
hundred tokens instead of tens of thousands); the defaults are printed with the table.
``inductor=False`` (``--no-inductor``) applies the same passes but runs the rewritten graphs
eagerly: identical decisions, no compile time (what the CI test uses).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import compile_language_model, reset_stats, stats
from .helpers import uncompile_language_model
from .toyvlm import task

SHIPPED = Path(__file__).parent / "toyvlm" / "toyvlm.safetensors"
EVAL_SEED = 10 ** 9  # held-out seeds: the training stream never reaches them
# Probe counts and cache sizes scaled to the toy's few hundred tokens (ZipVLConfig's defaults
# are sized for tens of thousands)
# (and layer 0 dense: the toy's first layer mixes the whole image, its later layers concentrate;
# BENCHMARKS.md, issue 5)
TOY_PROBES = dict(recent_probes=8, random_probes=32, keep_recent=4, dense_layers=1)
TOY_CACHE = dict(group_size=32, residual_length=16)


@dataclass(frozen=True)
class Setting:
    """One evaluated configuration: ``backend`` None = dense eager; ``cache`` (high, low) bits
    or None = ``DynamicCache``."""

    name: str
    backend: dict | None = None
    cache: tuple[int, int] | None = None


@dataclass
class Result:
    """Accuracy of one setting on one level.  ``kept`` [layers]: mean kept ratio of each layer's
    prefill (empty for dense); ``kv_fraction``: bytes the KV cache held / its 16-bit size;
    ``predicted`` [n]: the answer token of every sample."""

    setting: str
    level: str
    n: int
    correct: int = 0
    kept: list[float] = field(default_factory=list)
    kv_fraction: float = 1.0
    predicted: list[int] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)

    @property
    def mean_kept(self) -> float:
        return sum(self.kept) / len(self.kept) if self.kept else 1.0

    @property
    def accuracy_interval(self) -> tuple[float, float]:
        """95% Wilson score interval of ``accuracy`` (``n`` questions)."""
        return wilson(self.correct, self.n)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (two-sided, ``z`` = 1.96: 95%)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def load_toyvlm(path: str | Path | None = None):
    """The toy VLM from a safetensors file written by ``toyvlm.train`` (default: shipped).
    Returns (model in eval mode, metadata dict)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .toyvlm.model import ToyVLM, ToyVLMConfig

    path = Path(path) if path is not None else SHIPPED
    if not path.is_file():
        raise FileNotFoundError(f"no toy VLM weights at {path} (train them with "
                                f"python -m zipvl_compile.toyvlm.train --out {path})")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    model = ToyVLM(ToyVLMConfig(**json.loads(meta["config"])))
    model.load_state_dict(load_file(str(path)))
    return model.eval(), meta


class ToyQuestions:
    """Held-out generated questions for the toy VLM: ``n`` per level of ``toyvlm.task`` on
    ``grid`` x ``grid`` images (seeds past ``EVAL_SEED``, never reached in training).

    The data-source interface ``evaluate`` uses (``eval_hf.CheckpointQuestions`` is the other):
    ``model`` (compiled per setting), ``levels``, ``count(level)``, ``batches(level, batch)`` and
    ``answer(batch, cache) -> (correct, predictions)``."""

    def __init__(self, model, *, n: int, grid: int, seed: int = EVAL_SEED):
        self.model, self.n, self.grid, self.seed = model, n, grid, seed
        self.levels = task.LEVELS

    def count(self, level: str) -> int:
        return self.n

    def batches(self, level: str, batch: int):
        lv = self.levels.index(level)
        samples = task.sample(self.n, self.grid, self.seed + lv, levels=(lv,))
        for i in range(0, self.n, batch):
            yield (samples.pixels[i:i + batch], samples.text[i:i + batch],
                   samples.answer[i:i + batch])

    def answer(self, batch, cache) -> tuple[int, list]:
        """Prefill the image and question into ``cache``, one decode step; the answer token."""
        pixels, text, answer = batch
        predicted = self.model.answer(pixels, text, cache).argmax(-1)
        return int((predicted == answer).sum()), predicted.tolist()

    def describe(self) -> str:
        return (f"{self.grid}x{self.grid} patches = {self.grid ** 2} visual tokens; {self.n} "
                "held-out samples per level")


def _make_cache(setting: Setting, cache_sizes: dict):
    if setting.cache is None:
        from transformers import DynamicCache
        return DynamicCache()
    from .cache import ZipVLCache
    high, low = setting.cache
    return ZipVLCache(high_bits=high, low_bits=low, **cache_sizes)


def evaluate(data, setting: Setting, *, batch: int, cache_sizes: dict | None = None,
             inductor: bool = True, progress=None) -> list[Result]:
    """Accuracy per level of ``setting`` on ``data`` (``ToyQuestions`` or
    ``eval_hf.CheckpointQuestions``).  Compiles ``data.model``'s language model for the setting
    (and undoes it after)."""
    cache_sizes = cache_sizes or {}
    torch._dynamo.reset()
    if setting.backend is not None:
        compile_language_model(data.model, inductor=inductor, **setting.backend)
    results = []
    order: dict[str, None] = {}  # every prefill site seen under this setting, in layer order
    try:
        for level in data.levels:
            res = Result(setting.name, level, data.count(level))
            sums: dict[str, list[float]] = {}
            held = dense = 0
            for chunk in data.batches(level, batch):
                reset_stats()
                cache = _make_cache(setting, cache_sizes)
                correct, predicted = data.answer(chunk, cache)
                res.correct += correct
                res.predicted += predicted
                for r in stats():   # a dense prefill (e.g. dense_layers) keeps every token
                    ratio = 1.0 if r.path == "dense" else r.kept_ratio
                    if r.phase == "prefill" and ratio is not None:
                        sums.setdefault(r.site, []).append(ratio)
                        order[r.site] = None
                if setting.cache is not None:
                    held, dense = held + cache.memory_bytes(), dense + cache.dense_bytes()
                if progress is not None:
                    progress.update(1)
            res.kept = [sum(sums[site]) / len(sums[site]) for site in order if site in sums]
            res.kv_fraction = held / dense if dense else 1.0
            results.append(res)
    finally:
        uncompile_language_model(data.model)  # back to eager for the next setting
    return results


def run(data, *, taus, caches, batch, probes, cache_sizes, inductor=True,
        progress=True) -> list[Result]:
    """Every setting of the module docstring; fixed-ratio settings follow their adaptive run.
    ``probes`` holds the backend's probe fields and optionally ``dense_layers``: those layers
    count as kept ratio 1 and the fixed ratio is the adaptive mean over the other layers."""
    skip = probes.get("dense_layers", 0)
    per_setting = sum(-(-data.count(level) // batch) for level in data.levels)
    total = per_setting * (1 + 2 * len(taus) + len(caches))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="batch", desc="zipvl eval")
    kw = dict(batch=batch, cache_sizes=cache_sizes, inductor=inductor, progress=bar)
    results = evaluate(data, Setting("dense"), **kw)
    for tau in taus:
        adaptive = evaluate(data, Setting(f"zipvl tau={tau}", dict(tau=tau, **probes)), **kw)
        sparse = [r.kept[skip:] for r in adaptive if r.kept[skip:]]
        mean = sum(sum(k) / len(k) for k in sparse) / len(sparse) if sparse else 1.0
        results += adaptive
        results += evaluate(data, Setting(f"fixed ratio {mean:.3f}",
                                          dict(ratio=round(mean, 6), **probes)), **kw)
    for high, low in caches:
        results += evaluate(data, Setting(f"zipvl tau=0.975 + cache {high}/{low}",
                                          dict(tau=0.975, **probes), (high, low)), **kw)
    if bar is not None:
        bar.close()
    return results


def _levels(results: list[Result]) -> list[str]:
    return list(dict.fromkeys(r.level for r in results))


def _by_setting(results: list[Result], cells, what: tuple[str, ...]) -> str:
    """One row per setting, ``cells(result)`` (len(what) strings) per level."""
    from tabulate import tabulate

    by = {(r.setting, r.level): r for r in results}
    rows = [[name] + [c for level in _levels(results) for c in cells(by[(name, level)])]
            for name in dict.fromkeys(r.setting for r in results)]
    headers = ["setting"] + [f"{lv} {w}" for lv in _levels(results) for w in what]
    return tabulate(rows, headers=headers)


def table(results: list[Result]) -> str:
    """Accuracy, mean kept ratio and KV-cache fraction per setting (rows) and level."""
    return _by_setting(results, lambda r: [f"{100 * r.accuracy:.1f}", f"{r.mean_kept:.3f}",
                                           f"{100 * r.kv_fraction:.0f}%"],
                       ("acc %", "kept", "KV"))


def interval_table(results: list[Result]) -> str:
    """95% Wilson interval of each accuracy (percent), settings by level: how far apart two
    accuracies must be to differ with ``n`` questions per level."""
    def cell(r):
        lo, hi = r.accuracy_interval
        return [f"{100 * lo:.1f}-{100 * hi:.1f}"]
    return _by_setting(results, cell, ("acc % 95% CI",))


def layer_table(results: list[Result]) -> str:
    """Kept ratio of every layer for the sparse settings, per level."""
    from tabulate import tabulate

    rows = [[r.setting, r.level] + [f"{k:.3f}" for k in r.kept] for r in results if r.kept]
    layers = max((len(r.kept) for r in results), default=0)
    return tabulate(rows, headers=["setting", "level"] + [f"L{i}" for i in range(layers)])


def plot(results: list[Result], path: str) -> None:
    """PNG: kept ratio per layer (adaptive runs, per level) and accuracy vs mean kept ratio
    (adaptive vs fixed ratio, per level)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        if r.kept and r.setting.startswith("zipvl tau") and "cache" not in r.setting:
            left.plot(range(len(r.kept)), r.kept, marker="o", label=f"{r.setting} {r.level}")
    left.set(xlabel="layer", ylabel="kept ratio", title="kept ratio per layer", ylim=(0, 1.05))
    left.legend(fontsize=7)
    for kind, marker in (("zipvl tau", "o"), ("fixed ratio", "x")):
        for level in _levels(results):
            pts = sorted((r.mean_kept, r.accuracy) for r in results
                         if r.setting.startswith(kind) and "cache" not in r.setting
                         and r.level == level)
            if pts:
                right.plot(*zip(*pts), marker=marker, label=f"{kind} {level}")
    for r in results:
        if r.setting == "dense":
            right.axhline(r.accuracy, linestyle=":", linewidth=0.8, color="gray")
    right.set(xlabel="mean kept ratio", ylabel="accuracy", title="accuracy vs kept ratio "
              "(dotted: dense)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_argument_group("what to evaluate (default: the shipped toy VLM)")
    src.add_argument("--weights", default=None, help="toy VLM safetensors (default: shipped)")
    src.add_argument("--n", type=int, default=256, help="toy: held-out samples per level")
    src.add_argument("--grid", type=int, default=None, help="toy: image grid (default: the "
                     "model's)")
    src.add_argument("--model", default=None, help="a transformers image-text-to-text "
                     "checkpoint (hub id or folder); needs --questions")
    src.add_argument("--questions", default=None, help="JSON Lines image-question file "
                     "(format: zipvl_compile/eval_hf.py)")
    src.add_argument("--max-new-tokens", type=int, default=16)
    src.add_argument("--device", default=None, help="checkpoint: default cuda if available")
    src.add_argument("--dtype", default=None, help="checkpoint: default bfloat16 on CUDA, "
                     "float32 on CPU")
    ap.add_argument("--batch", type=int, default=None, help="default: toy 64, checkpoint 4")
    ap.add_argument("--taus", type=float, nargs="+", default=[0.95, 0.975, 0.99])
    ap.add_argument("--caches", nargs="*", default=["8/4", "4/2", "4/0"],
                    help="ZipVLCache HIGH/LOW bit settings")
    sizes = ap.add_argument_group("probe and cache sizes (default: scaled down for the toy's "
                                  "few hundred tokens; ZipVLConfig's defaults for a checkpoint)")
    for flag in ("recent-probes", "random-probes", "keep-recent", "group-size",
                 "residual-length"):
        sizes.add_argument(f"--{flag}", type=int, default=None)
    ap.add_argument("--dense-layers", type=int, default=None,
                    help="ZipVLConfig.dense_layers: the first N layers keep dense prefill "
                         "(default: toy 1, checkpoint 0)")
    ap.add_argument("--no-inductor", action="store_true",
                    help="apply the passes but run the graphs eagerly (fast, same decisions)")
    ap.add_argument("--plot", default=None, help="write the PNG plot here")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if (args.model is None) != (args.questions is None):
        ap.error("--model and --questions go together")

    if args.model is None:
        model, meta = load_toyvlm(args.weights)
        data = ToyQuestions(model, n=args.n, grid=args.grid or model.config.grid)
        source = (f"{args.weights or SHIPPED} (recorded dense accuracy "
                  f"{meta.get('accuracy', '?')})")
        defaults = dict(TOY_PROBES, **TOY_CACHE, batch=64)
    else:
        from . import eval_hf
        from .config import ZipVLConfig
        questions = eval_hf.read_questions(args.questions)
        model, processor = eval_hf.load_checkpoint(args.model, device=args.device,
                                                   dtype=args.dtype)
        data = eval_hf.CheckpointQuestions(model, processor, questions,
                                           max_new_tokens=args.max_new_tokens)
        source = f"{args.model} on {args.questions}"
        c = ZipVLConfig()
        defaults = dict(recent_probes=c.recent_probes, random_probes=c.random_probes,
                        keep_recent=c.keep_recent, group_size=c.group_size,
                        residual_length=c.residual_length, dense_layers=c.dense_layers,
                        batch=4)
    pick = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in defaults.items()}
    caches = [tuple(int(b) for b in c.split("/")) for c in args.caches]
    probes = {k: pick[k] for k in ("recent_probes", "random_probes", "keep_recent",
                                   "dense_layers")}
    sizes = {k: pick[k] for k in ("group_size", "residual_length")}
    with torch.no_grad():
        results = run(data, taus=args.taus, caches=caches, batch=pick["batch"], probes=probes,
                      cache_sizes=sizes, inductor=not args.no_inductor,
                      progress=not args.no_progress)
    print(f"\nmodel: {source}\n{data.describe()}\nprobes {probes}; cache {sizes}")
    print(table(results))
    print("\naccuracy, 95% Wilson intervals")
    print(interval_table(results))
    print("\nkept ratio per layer")
    print(layer_table(results))
    if args.plot:
        plot(results, args.plot)
        print("plot:", args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(vars(r), accuracy=r.accuracy, accuracy_interval=r.accuracy_interval)
                       for r in results], f, indent=1)
    return results


if __name__ == "__main__":
    main()
