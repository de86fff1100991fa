"""Train the toy VLM from scratch on freshly generated samples (fixed seed).

    python -m zipvl_compile.toyvlm.train --out zipvl_compile/toyvlm/toyvlm.safetensors

Every step draws a new batch (seed = ``--seed`` * 1_000_003 + step) over all difficulty levels;
held-out evaluation uses seeds the training stream never reaches (``EVAL_SEED``).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from . import task
from .model import ToyVLM, ToyVLMConfig

EVAL_SEED = 10 ** 9


def accuracy(model, grid, n=512, seed=EVAL_SEED, device="cpu") -> dict:
    """Dense accuracy per level on held-out samples (the answer after a decode step)."""
    out = {}
    for lv, name in enumerate(task.LEVELS):
        b = task.sample(n, grid, seed + lv, levels=(lv,))
        logits = model.answer(b.pixels.to(device), b.text.to(device))
        out[name] = (logits.argmax(-1).cpu() == b.answer).float().mean().item()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2],
                    help="difficulty levels to train on (0 easy, 1 medium, 2 hard)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="zipvl_compile/toyvlm/toyvlm.safetensors")
    args = ap.parse_args()
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    cfg = ToyVLMConfig(grid=args.grid)
    model = ToyVLM(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=0.05)
    t0 = time.time()
    for step in range(args.steps):
        b = task.sample(args.batch, args.grid, args.seed * 1_000_003 + step,
                        levels=tuple(args.levels))
        logits = model(b.pixels.to(args.device), b.text.to(args.device))
        target = torch.stack([torch.full_like(b.answer, task.ANS), b.answer], 1).to(args.device)
        loss = F.cross_entropy(logits.reshape(-1, task.VOCAB), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            acc = (logits[:, 1].argmax(-1).cpu() == b.answer).float().mean().item()
            print(f"step {step} loss {loss.item():.4f} train acc {acc:.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    acc = accuracy(model, args.grid, device=args.device)
    print("held-out dense accuracy:", acc)
    meta = dict(config=json.dumps(model.config_dict()), accuracy=json.dumps(acc),
                command=f"python -m zipvl_compile.toyvlm.train --grid {args.grid} "
                        f"--steps {args.steps} --batch {args.batch} --lr {args.lr} "
                        f"--seed {args.seed} --levels {' '.join(map(str, args.levels))}")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              args.out, metadata=meta)
    print("saved", args.out)


if __name__ == "__main__":
    main()
