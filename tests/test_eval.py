"""The accuracy harness (``zipvl_compile.eval``) and the shipped toy VLM weights."""
import json

import pytest
import torch

from zipvl_compile import eval as harness
from zipvl_compile.toyvlm import task


@pytest.fixture(scope="module")
def shipped():
    return harness.load_toyvlm()


@torch.no_grad()
def test_shipped_weights_reach_their_recorded_dense_accuracy(shipped):
    model, meta = shipped
    recorded = json.loads(meta["accuracy"])
    grid = json.loads(meta["eval"])["grid"]
    assert grid == model.config.grid and grid * grid >= 500  # several hundred visual tokens
    for lv, level in enumerate(task.LEVELS):
        b = task.sample(48, grid, harness.EVAL_SEED + lv, levels=(lv,))
        acc = (model.answer(b.pixels, b.text).argmax(-1) == b.answer).float().mean().item()
        assert acc >= recorded[level] - 0.05, (level, acc, recorded[level])
    assert recorded["easy"] > 0.9 and "toyvlm.train" in meta["command"]


def test_harness_end_to_end_on_a_small_slice(tmp_path, capsys):
    png, out = tmp_path / "acc.png", tmp_path / "acc.json"
    results = harness.main(["--n", "8", "--batch", "4", "--grid", "8", "--taus", "0.975",
                            "--caches", "8/4", "4/2", "--group-size", "8", "--residual-length", "4",
                            "--no-inductor", "--no-progress",
                            "--plot", str(png), "--json", str(out)])
    by = {(r.setting, r.level): r for r in results}
    names = list(dict.fromkeys(r.setting for r in results))
    assert names[0] == "dense" and names[1] == "zipvl tau=0.975"
    assert names[2].startswith("fixed ratio") and names[3:] == [
        "zipvl tau=0.975 + cache 8/4", "zipvl tau=0.975 + cache 4/2"]
    for level in task.LEVELS:
        dense, adaptive = by[("dense", level)], by[("zipvl tau=0.975", level)]
        fixed, eight, cached = (by[(names[i], level)] for i in (2, 3, 4))
        assert dense.kept == [] and dense.kv_fraction == 1.0 and dense.n == 8
        # the toy's default: layer 0 dense (kept ratio 1), the fixed ratio is the adaptive
        # mean over the other layers
        assert len(adaptive.kept) == 4 and adaptive.kept[0] == fixed.kept[0] == 1.0
        assert all(0 < k <= 1 for k in adaptive.kept)
        ratio = float(names[2].split()[-1])
        assert all(abs(k - ratio) < 0.02 for k in fixed.kept[1:])  # ceil(ratio * valid) / valid
        # packed codes + fp16 scales per group of 8 + a 4-token residual window
        assert 0 < cached.kv_fraction < eight.kv_fraction < 1
        assert cached.kept == adaptive.kept == eight.kept  # the same prefill decisions
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out.read_text())
    assert len(saved) == 5 * len(task.LEVELS)
    assert {"accuracy", "accuracy_interval", "kept"} <= set(saved[0])
    for r in saved:
        lo, hi = r["accuracy_interval"]
        assert 0 <= lo <= r["accuracy"] <= hi <= 1 and hi - lo > 0.1  # 8 questions: wide
    printed = capsys.readouterr().out
    assert "kept ratio per layer" in printed and "fixed ratio" in printed
    assert "95% Wilson intervals" in printed


def test_wilson_interval_matches_known_values():
    """Values worked by hand from the Wilson formula: 113 of 128 -> [0.8156, 0.9277]; all of
    128 -> [0.9709, 1]; none of 10 -> [0, 0.2775]."""
    for (k, n), (lo, hi) in (((113, 128), (0.8156, 0.9277)), ((128, 128), (0.9709, 1.0)),
                             ((0, 10), (0.0, 0.2775))):
        got = harness.wilson(k, n)
        assert abs(got[0] - lo) < 5e-4 and abs(got[1] - hi) < 5e-4, (k, n, got)


@torch.no_grad()
def test_eager_passes_mode_matches_the_compiled_backend(shipped):
    """``--no-inductor`` (what the test above and quick runs use) makes the same decisions and
    gets the same answers as the Inductor-compiled backend."""
    model, _ = shipped
    setting = harness.Setting("zipvl", dict(tau=0.975, recent_probes=8, random_probes=32,
                                            keep_recent=4))
    data = harness.ToyQuestions(model, n=6, grid=6)
    eager = harness.evaluate(data, setting, batch=6, inductor=False)
    compiled = harness.evaluate(data, setting, batch=6, inductor=True)
    for a, b in zip(eager, compiled):  # fp32 reductions may order differently: budgets can
        assert abs(a.correct - b.correct) <= 1  # move by a token
        assert a.kept == pytest.approx(b.kept, abs=0.01)
