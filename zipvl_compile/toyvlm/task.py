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
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")
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
    level [B]; relevant [B, P] bool (patches the answer depends on); patch_glyph, patch_colour
    [B, P] int64: what each patch shows (``N_GLYPHS`` / ``len(COLOURS)`` = nothing: the labels of
    the vision encoder's pre-training objective)."""

    pixels: torch.Tensor
    text: torch.Tensor
    answer: torch.Tensor
    level: torch.Tensor
    relevant: torch.Tensor
    patch_glyph: torch.Tensor
    patch_colour: torch.Tensor


def sample(n: int, grid: int, seed: int, levels=(0, 1, 2), clutter: float = 0.3) -> Batch:
    """``n`` samples with levels drawn uniformly from ``levels`` (vectorized; CPU generator, so a
    seed gives the same samples on every device)."""
    g = torch.Generator().manual_seed(seed)
    P = grid * grid
    n_clutter = int(clutter * P)
    level = torch.tensor(levels)[torch.randint(len(levels), (n,), generator=g)]
    target = torch.randint(len(COLOURS), (n,), generator=g)
    lo = torch.tensor([1, COUNTS[1][0], COUNTS[2][0]])[level]
    hi = torch.tensor([1, COUNTS[1][1], COUNTS[2][1]])[level]
    k = lo + (torch.rand(n, generator=g) * (hi - lo + 1)).long().clamp(max=hi - lo)
    # rank[i, p]: position of patch p in a random permutation; the first k are relevant,
    # the next n_clutter carry distractor glyphs in another colour
    rank = torch.rand(n, P, generator=g).argsort(1).argsort(1)
    relevant = rank < k[:, None]
    glyphed = rank < (k + n_clutter)[:, None]
    other = (target[:, None] + 1 + torch.randint(len(COLOURS) - 1, (n, P), generator=g)) % len(
        COLOURS)
    colour = torch.where(relevant, target[:, None], other)
    glyph = torch.randint(N_GLYPHS, (n, P), generator=g)
    noise = 0.15 * torch.rand(n, P, 4, 4, 3, generator=g)
    drawn = GLYPHS[glyph][..., None] * COLOURS[colour][:, :, None, None, :]
    pixels = noise + glyphed[:, :, None, None, None] * drawn
    first = (rank == 0).float().argmax(1)           # the relevant patch of a find question
    found = glyph.gather(1, first[:, None])[:, 0]
    answer = DIGIT0 + torch.where(level == 0, found, k)
    text = torch.stack([torch.full_like(level, BOS), torch.where(level == 0, FIND, COUNT),
                        COLOUR0 + target, torch.full_like(level, ANS)], 1)
    return Batch(pixels.reshape(n, P, PATCH), text, answer, level, relevant,
                 torch.where(glyphed, glyph, N_GLYPHS), torch.where(glyphed, colour, len(COLOURS)))
