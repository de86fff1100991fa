"""The synthetic VQA task and the toy VLM (issue 5 groundwork)."""
import warnings

import pytest
import torch

from zipvl_compile import ZipVLCache
from zipvl_compile.toyvlm import task
from zipvl_compile.toyvlm.model import ToyVLM, ToyVLMConfig


def test_answers_follow_from_the_relevant_patches():
    b = task.sample(24, grid=6, seed=3)
    colours = task.COLOURS
    for i in range(24):
        target = colours[int(b.text[i, 2]) - task.COLOUR0]
        patches = b.pixels[i].view(-1, 4, 4, 3)
        # a patch carries the target colour where its glyph pixels match the colour exactly
        # up to the background noise (< 0.15): find them from the pixels alone
        on = ((patches - target).abs() < 0.151).all(-1).any(-1).any(-1)
        assert torch.equal(on, b.relevant[i])
        # the vision objective's labels: target-coloured patches are the relevant ones, and a
        # patch has a glyph label exactly when some pixel stands out of the noise
        assert torch.equal(b.patch_colour[i] == int(b.text[i, 2]) - task.COLOUR0, b.relevant[i])
        shows = (patches > 0.151).any(-1).any(-1).any(-1)
        assert torch.equal(b.patch_glyph[i] < task.N_GLYPHS, shows)
        assert torch.equal(b.patch_colour[i] < len(task.COLOURS), shows)
        k = int(b.relevant[i].sum())
        if b.level[i] == 0:
            assert k == 1 and int(b.text[i, 1]) == task.FIND
            j = int(b.relevant[i].nonzero())
            glyph = (patches[j] - 0.15 > 0).any(-1).float()  # glyph pixels exceed the noise
            assert int(b.answer[i]) - task.DIGIT0 == int(
                (task.GLYPHS == glyph).all(-1).all(-1).nonzero())
        else:
            lo, hi = task.COUNTS[int(b.level[i])]
            assert lo <= k <= hi and int(b.answer[i]) - task.DIGIT0 == k


def test_samples_are_reproducible_from_the_seed():
    a, b = task.sample(4, 5, seed=11), task.sample(4, 5, seed=11)
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.answer, b.answer)
    assert not torch.equal(a.pixels, task.sample(4, 5, seed=12).pixels)


TINY = dict(grid=4, hidden=32, vision_dim=16, layers=2, intermediate=64)


@pytest.mark.parametrize("bos_first", [False, True])
@torch.no_grad()
def test_answering_through_the_cache_matches_the_training_forward(bos_first):
    torch.manual_seed(0)
    model = ToyVLM(ToyVLMConfig(**TINY, bos_first=bos_first))
    model.eval()
    b = task.sample(3, 4, seed=5)
    full = model(b.pixels, b.text)[:, 1]
    with warnings.catch_warnings():  # the cache keyword of the installed transformers
        warnings.simplefilter("error", FutureWarning)
        torch.testing.assert_close(model.answer(b.pixels, b.text), full, rtol=1e-4, atol=1e-5)
        cached = model.answer(b.pixels, b.text, ZipVLCache(high_bits=16, low_bits=16,
                                                           group_size=4, residual_length=4))
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)


def test_training_stages_are_parsed_and_validated():
    import argparse

    from zipvl_compile.toyvlm.train import parse_stage

    assert parse_stage("4:1500:0") == (4, 1500, (0,))
    assert parse_stage("24:2000") == (24, 2000, (0, 1, 2))
    assert parse_stage("8:10:0012") == (8, 10, (0, 0, 1, 2))
    for bad in ("4", "1:10", "4:0", "4:10:3", "4:10:0:1", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError, match="stage"):
            parse_stage(bad)


@torch.no_grad()
def test_bos_first_layout_puts_bos_before_the_image():
    torch.manual_seed(0)
    b = task.sample(2, 4, seed=1)
    first, last = (ToyVLM(ToyVLMConfig(**TINY, bos_first=f)) for f in (True, False))
    last.load_state_dict(first.state_dict())
    bos = first.language_model.embed_tokens(b.text[:, :1])
    torch.testing.assert_close(first.embed(b.pixels, b.text)[:, :1], bos)
    torch.testing.assert_close(last.embed(b.pixels, b.text)[:, 16:17], bos)
    torch.testing.assert_close(first.embed(b.pixels, b.text)[:, 1:17],
                               last.embed(b.pixels, b.text)[:, :16])


def test_attention_mass_entropy_is_that_of_the_column_sums():
    """The training penalty: per layer, the entropy of the normalized column sums of the
    attention (every head and query row) of each sample, averaged over the batch; it has a
    gradient (no NaN from the masked, exactly zero, weights)."""
    torch.manual_seed(0)
    model = ToyVLM(ToyVLMConfig(**TINY, bos_first=True))
    model.language_model.set_attn_implementation("eager")
    b = task.sample(3, 4, seed=2)
    logits, entropy = model.forward_with_attention_entropy(b.pixels, b.text)
    torch.testing.assert_close(logits, model(b.pixels, b.text))
    attentions = model.language_model(inputs_embeds=model.embed(b.pixels, b.text),
                                      output_attentions=True).attentions
    expected = []
    for a in attentions:
        p = a.sum((1, 2)) / a.sum((1, 2, 3))[:, None]
        expected.append(torch.stack([torch.distributions.Categorical(probs=q).entropy()
                                     for q in p]).mean())
    torch.testing.assert_close(entropy, torch.stack(expected))
    assert 0 < entropy.min() and entropy.max() < torch.log(torch.tensor(20.0))
    entropy.max().backward()
    grads = [p.grad for p in model.language_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.language_model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="eager"):
        model.forward_with_attention_entropy(b.pixels, b.text)


def test_fine_tuning_keeps_the_initial_layout_and_records_its_origin(tmp_path, monkeypatch):
    import json

    from safetensors import safe_open

    from zipvl_compile.toyvlm import train

    def run(*argv):
        monkeypatch.setattr("sys.argv", ["train", *argv, "--eval-n", "4", "--device", "cpu"])
        train.main()
        with safe_open(argv[argv.index("--out") + 1], "pt") as f:
            return f.metadata()

    base, tuned = str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")
    first = run("--stages", "4:2:0", "--bos-first", "--out", base)
    meta = run("--stages", "4:1:012", "--init", base, "--attn-entropy", "0.5", "--out", tuned)
    assert json.loads(meta["config"])["bos_first"] is True     # from the initial weights
    assert meta["init_command"] == first["command"]
    assert "--attn-entropy 0.5" in meta["command"] and f"--init {base}" in meta["command"]
    assert "--bos-first" in meta["command"]
