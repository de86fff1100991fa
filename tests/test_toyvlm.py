"""The synthetic VQA task and the toy VLM (issue 5 groundwork)."""
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


@torch.no_grad()
def test_answering_through_the_cache_matches_the_training_forward():
    torch.manual_seed(0)
    model = ToyVLM(ToyVLMConfig(grid=4, hidden=32, vision_dim=16, layers=2, intermediate=64))
    model.eval()
    b = task.sample(3, 4, seed=5)
    full = model(b.pixels, b.text)[:, 1]
    torch.testing.assert_close(model.answer(b.pixels, b.text), full, rtol=1e-4, atol=1e-5)
    cached = model.answer(b.pixels, b.text,
                          ZipVLCache(high_bits=16, low_bits=16, group_size=4, residual_length=4))
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
