"""`python -m pipeline sample --checkpoint DIR --n 64 --temperature 0.7 --out grid.png`."""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from pipeline import progress
from pipeline.train.images import save_grid
from pipeline.train.inference import load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint step folder or run folder")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--temperature", type=float, default=0.7, help="scale of the prior's std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png", help="PNG grid to write")


def run(args: argparse.Namespace) -> int:
    model, _, folder = load_model(args.checkpoint, stage=progress.stage)
    generator = torch.Generator().manual_seed(args.seed)
    blocks = sum(1 for _ in model.blocks())
    with (
        progress.stage(f"sampling (n={args.n}, temperature {args.temperature})"),
        tqdm(total=blocks, desc="inverted", unit="block", file=sys.stderr) as bar,
        torch.no_grad(),
    ):
        x = model.sample(args.n, args.temperature, generator, inverted=bar.update)
    if not torch.isfinite(x).all():
        print(f"warning: {int((~torch.isfinite(x)).sum())} non-finite values in the samples")
    save_grid(x, args.out)
    print(f"wrote {args.out}: {args.n} samples at temperature {args.temperature} from {folder}")
    return 0
