"""Train the toy VLM from scratch on freshly generated samples (fixed seed), then fine-tune it
towards concentrated attention.  The shipped ``toyvlm.safetensors`` (H100: 5.5 + 3 + 2 min):

    python -m zipvl_compile.toyvlm.train --bos-first --out dense.safetensors
    python -m zipvl_compile.toyvlm.train --init dense.safetensors --stages 24:2000:012 \
        --lr 3e-4 --warmup 50 --eval-n 256 --attn-entropy 0.4 --out step1.safetensors
    python -m zipvl_compile.toyvlm.train --init step1.safetensors --stages 24:2000:012 \
        --lr 3e-4 --warmup 50 --eval-n 256 --attn-entropy 2.0 \
        --out zipvl_compile/toyvlm/toyvlm.safetensors

Training is a curriculum: each ``GRID:STEPS:LEVELS`` stage draws images of ``GRID x GRID``
patches (the model has no per-patch position table, so it takes any grid) with questions of the
given difficulty levels.  Measured: from scratch, *find* among 64 patches stayed at chance
(1500 steps) and, trained on all levels at once, even 16 patches learned counting but not
*find*; *find* alone on 16 patches reached only 35% after 3000 steps.  What works: the vision
objective (``--vision-loss``: the encoder also predicts each patch's glyph and colour, as LLaVA
starts from a pre-trained encoder), find on small images first, then every level, then larger
images.  Every
step draws a new batch (seed = ``--seed`` * 1_000_003 + step) over its stage's levels; held-out
evaluation uses seeds the training stream never reaches (``EVAL_SEED``).  One AdamW run with
linear warm-up and cosine decay over all stages.

Dense training leaves attention spread over most of the image (ZipVL at tau=0.975 keeps 86% of
the tokens).  ``--init W --attn-entropy L`` fine-tunes weights with a penalty on how spread the
attention mass of the least concentrated layer is (``ToyVLM.forward_with_attention_entropy``),
with BOS before the image (``--bos-first``, LLaVA's layout: a token every query can find, where
the mass gathers), dense accuracy stays at 100%.  Layer 0 still reads most of the image to
count, so ZipVL runs the toy with ``dense_layers=1`` (BENCHMARKS.md, issue 5, session 7).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch
import torch.nn.functional as F

from . import task
from .model import ToyVLM, ToyVLMConfig

EVAL_SEED = 10 ** 9
DEFAULT_STAGES = "4:1500:0 4:1000:0012 8:1500:0012 16:1500:0012 24:2000:0012"  # dense stage


@torch.no_grad()
def accuracy(model, grid, n=512, seed=EVAL_SEED, device="cpu", batch=128) -> dict:
    """Dense accuracy per level on held-out samples (the answer after a decode step)."""
    out = {}
    for lv, name in enumerate(task.LEVELS):
        b = task.sample(n, grid, seed + lv, levels=(lv,))
        hits = 0
        for i in range(0, n, batch):
            logits = model.answer(b.pixels[i:i + batch].to(device), b.text[i:i + batch].to(device))
            hits += (logits.argmax(-1).cpu() == b.answer[i:i + batch]).sum().item()
        out[name] = hits / n
    return out


def parse_stage(text: str) -> tuple[int, int, tuple[int, ...]]:
    """``GRID:STEPS`` or ``GRID:STEPS:LEVELS`` (levels as digits, e.g. ``0`` or ``012``)."""
    parts = text.split(":")
    try:
        grid, steps = int(parts[0]), int(parts[1])
        levels = tuple(int(c) for c in parts[2]) if len(parts) > 2 else (0, 1, 2)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"stage {text!r}: expected GRID:STEPS[:LEVELS]")
    if grid < 2 or steps < 1 or not levels or any(lv not in (0, 1, 2) for lv in levels) \
            or len(parts) > 3:
        raise argparse.ArgumentTypeError(
            f"stage {text!r}: need GRID >= 2, STEPS >= 1, LEVELS digits of 0 1 2")
    return grid, steps, levels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=parse_stage, nargs="+", default=[
                    parse_stage(s) for s in DEFAULT_STAGES.split()],
                    help="GRID:STEPS[:LEVELS] curriculum, in order (levels: digits of 0 1 2)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vision-loss", type=float, default=1.0,
                    help="weight of the patch encoder's glyph/colour objective (0: off)")
    ap.add_argument("--attn-entropy", type=float, default=0.0,
                    help="weight in the loss of the entropy of where attention mass lands, in "
                         "the least concentrated layer (0: off; ToyVLM."
                         "forward_with_attention_entropy): attention gathers on few keys, as "
                         "in trained LVLMs")
    ap.add_argument("--bos-first", action="store_true",
                    help="BOS before the image tokens (ToyVLMConfig.bos_first)")
    ap.add_argument("--init", default=None,
                    help="start from these weights (a file this script wrote) instead of "
                         "from scratch: fine-tuning, e.g. with --attn-entropy")
    ap.add_argument("--eval-n", type=int, default=512)
    ap.add_argument("--save-stages", action="store_true",
                    help="also evaluate and save the model after every stage (OUT.gGRID.sN)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="zipvl_compile/toyvlm/toyvlm.safetensors")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    final_grid = args.stages[-1][0]
    schedule = [(g, lv) for g, s, lv in args.stages for _ in range(s)]
    if args.init:  # the architecture (and layout) are the initial weights'
        from ..eval import load_toyvlm

        model, init_meta = load_toyvlm(args.init)
        model = model.train().to(args.device)
        args.init_command = init_meta.get("command")
    else:
        model = ToyVLM(ToyVLMConfig(grid=final_grid, bos_first=args.bos_first)).to(args.device)
    if args.attn_entropy:
        model.language_model.set_attn_implementation("eager")  # SDPA returns no weights
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    total = len(schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / args.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * i / total)))
    ends = itertools.accumulate(steps for _, steps, _ in args.stages)
    stage_ends = {end - 1: (i, g) for i, ((g, _, _), end) in enumerate(zip(args.stages, ends))}
    t0 = time.time()
    for step, (grid, levels) in enumerate(schedule):
        b = task.sample(args.batch, grid, args.seed * 1_000_003 + step, levels=levels)
        entropy = None
        if args.attn_entropy:
            logits, entropy = model.forward_with_attention_entropy(b.pixels.to(args.device),
                                                                   b.text.to(args.device))
        else:
            logits = model(b.pixels.to(args.device), b.text.to(args.device))
        target = torch.stack([torch.full_like(b.answer, task.ANS), b.answer], 1).to(args.device)
        loss = F.cross_entropy(logits.reshape(-1, task.VOCAB), target.reshape(-1))
        if args.vision_loss:
            glyph, colour = model.patch_logits(b.pixels.to(args.device))
            loss = loss + args.vision_loss * (
                F.cross_entropy(glyph.flatten(0, 1), b.patch_glyph.to(args.device).flatten())
                + F.cross_entropy(colour.flatten(0, 1), b.patch_colour.to(args.device).flatten()))
        if entropy is not None:
            # the least concentrated layer: a mean over layers leaves layer 0 aggregating the
            # whole image (counting by a prefix average), which no sparse prefill can keep
            loss = loss + args.attn_entropy * entropy.max()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == total - 1:
            acc = (logits[:, 1].argmax(-1).cpu() == b.answer).float().mean().item()
            print(f"step {step} grid {grid} loss {loss.item():.4f} train acc {acc:.3f}"
                  + (" attention mass entropy per layer "
                     + " ".join(f"{e:.2f}" for e in entropy.tolist())
                     if entropy is not None else "")
                  + f" ({time.time() - t0:.0f}s)", flush=True)
        if args.save_stages and step in stage_ends and step != total - 1:
            i, g = stage_ends[step]
            save(model, args, args.out.replace(".safetensors", f".g{g}.s{i}.safetensors"), g,
                 after_stage=i)
            model.train()
    save(model, args, args.out, final_grid, after_stage=len(args.stages) - 1)


def save(model, args, path, grid, after_stage):
    """Evaluate (dense, held-out, at ``grid``) and save weights + metadata to ``path``: the
    state after stage ``after_stage`` (0-based) of the run ``command`` describes."""
    from safetensors.torch import save_file

    model.eval()
    implementation = model.language_model.config._attn_implementation
    model.language_model.set_attn_implementation("sdpa")   # as the model is loaded and served
    acc = accuracy(model, grid, n=args.eval_n, device=args.device)
    model.language_model.set_attn_implementation(implementation)
    print(f"held-out dense accuracy at grid {grid}:", acc, flush=True)
    text = " ".join(f"{g}:{s}:{''.join(map(str, lv))}" for g, s, lv in args.stages)
    cfg = dict(model.config_dict(), grid=grid)
    meta = dict(config=json.dumps(cfg), accuracy=json.dumps(acc),
                eval=json.dumps(dict(n=args.eval_n, seed=EVAL_SEED, grid=grid)),
                command=f"python -m zipvl_compile.toyvlm.train --stages {text} "
                        f"--batch {args.batch} --lr {args.lr} --warmup {args.warmup} "
                        f"--vision-loss {args.vision_loss} --attn-entropy {args.attn_entropy} "
                        f"--seed {args.seed}" + (" --bos-first" if model.config.bos_first else "")
                        + (f" --init {args.init}" if args.init else ""),
                after_stage=str(after_stage))
    if args.init:   # how the weights it started from were made
        meta["init_command"] = args.init_command or "unknown"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              path, metadata=meta)
    print("saved", path, flush=True)


if __name__ == "__main__":
    main()
