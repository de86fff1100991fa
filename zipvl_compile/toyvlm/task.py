"""Synthetic visual question answering where the answer depends on a few patches.

An image is a ``grid x grid`` array of patches of ``PATCH`` pixels (4 x 4 x 3).  Every patch
carries noise; about ``clutter`` of them carry one of ten glyphs (fixed 4 x 4 binary patterns)
drawn in one of the distractor colours.  A question names a *target colour*:

- ``find``: exactly one patch has the target colour; the answer is its glyph (0-9).
- ``count``: ``k`` patches have the target colour; the answer is ``k`` (1-9).

Difficulty is the number of relevant patches: level 0 = find (1 patch), level 1 = count of
2-4, level 2 = count of 5-9.  Samples are generated from a seed, so held-out sets are fixed.

Token layout of a sample (text after the image tokens):
``[BOS, QTYPE, COLOUR, ANS] -> answer``; the model is trained to predict ``ANS`` after the
colour token and the answer after ``ANS``, so answering takes one decode step over the cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PATCH = 4 * 4 * 3
N_GLYPHS = 10
COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0], [1.0, 1.0, 0.1],
                        [1.0, 0.1, 1.0], [0.1, 1.0, 1.0]])
# vocabulary
PAD, BOS, ANS = 0, 1, 2
FIND, COUNT = 3, 4
COLOUR0 = 5                       # 6 colour tokens: 5..10
DIGIT0 = COLOUR0 + len(COLOURS)   # 10 answer tokens: 11..20
VOCAB = DIGIT0 + 10
LEVELS = ("easy", "medium", "hard")
COUNTS = {1: (2, 4), 2: (5, 9)}


def glyphs(seed: int = 1234) -> torch.Tensor:
    """The ten fixed glyphs: [10, 4, 4] binary patterns (distinct, at least 5 pixels on)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < N_GLYPHS:
        p = (torch.rand(4, 4, generator=g) < 0.5).float()
        if p.sum() >= 5 and all((p != q).sum() >= 4 for q in out):
            out.append(p)
    return torch.stack(out)


GLYPHS = glyphs()


@dataclass
class Batch:
    """pixels [B, P, PATCH]; text [B, 4] (BOS, QTYPE, COLOUR, ANS); answer [B] token ids;
    level [B]; relevant [B, P] bool (patches the answer depends on)."""

    pixels: torch.Tensor
    text: torch.Tensor
    answer: torch.Tensor
    level: torch.Tensor
    relevant: torch.Tensor


def _draw(colour: torch.Tensor, glyph: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return (glyph[:, :, None] * colour[None, None, :] + noise).reshape(PATCH)


def sample(n: int, grid: int, seed: int, levels=(0, 1, 2), clutter: float = 0.3) -> Batch:
    """``n`` samples with levels drawn uniformly from ``levels``."""
    g = torch.Generator().manual_seed(seed)
    P = grid * grid
    pixels = 0.15 * torch.rand(n, P, 4, 4, 3, generator=g)
    text = torch.empty(n, 4, dtype=torch.long)
    answer = torch.empty(n, dtype=torch.long)
    level = torch.tensor(levels)[torch.randint(len(levels), (n,), generator=g)]
    relevant = torch.zeros(n, P, dtype=torch.bool)
    for i in range(n):
        target = int(torch.randint(len(COLOURS), (1,), generator=g))
        others = [c for c in range(len(COLOURS)) if c != target]
        lv = int(level[i])
        k = 1 if lv == 0 else int(torch.randint(COUNTS[lv][0], COUNTS[lv][1] + 1, (1,),
                                                generator=g))
        order = torch.randperm(P, generator=g)
        rel = order[:k]
        clut = order[k:k + int(clutter * P)]
        for j in clut.tolist():
            c = others[int(torch.randint(len(others), (1,), generator=g))]
            gl = GLYPHS[int(torch.randint(N_GLYPHS, (1,), generator=g))]
            pixels[i, j] = pixels[i, j] + gl[:, :, None] * COLOURS[c]
        glyph_ids = torch.randint(N_GLYPHS, (k,), generator=g)
        for j, gi in zip(rel.tolist(), glyph_ids.tolist()):
            pixels[i, j] = pixels[i, j] + GLYPHS[gi][:, :, None] * COLOURS[target]
        relevant[i, rel] = True
        text[i] = torch.tensor([BOS, FIND if lv == 0 else COUNT, COLOUR0 + target, ANS])
        answer[i] = DIGIT0 + (int(glyph_ids[0]) if lv == 0 else k)
    return Batch(pixels.reshape(n, P, PATCH), text, answer, level, relevant)
