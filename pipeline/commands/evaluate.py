"""`python -m pipeline evaluate --checkpoint DIR [--shards DIR] [--json] [--json-out PATH]`:
validation bits/dim, one process."""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from tqdm import tqdm

from pipeline import progress
from pipeline.data import build_loader, resolve_shards
from pipeline.io import atomic_write_text
from pipeline.train.inference import open_checkpoint, restore_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint step folder or run folder")
    p.add_argument("--shards", help="shards folder (default: the one the run trained on)")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=0, help="0: the whole split")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--json-out",
        metavar="PATH",
        help="also write the result as JSON to PATH (atomically): what a caller reads",
    )


def run(args: argparse.Namespace) -> int:
    folder, cfg = open_checkpoint(args.checkpoint, progress.stage)
    data = cfg.data
    if args.shards:
        data = dataclasses.replace(data, source="shards", shards=args.shards)
    shards = resolve_shards(data)  # before the model: a missing shard folder fails at once
    loader = build_loader(data, shards, args.split, args.batch_size, rank=0, world_size=1)
    model = restore_model(folder, cfg, stage=progress.stage)
    total, count = 0.0, 0
    n = loader.batches_per_epoch  # the train stream is endless: one epoch of it
    if args.max_batches:
        n = min(n, args.max_batches)
    with (
        progress.stage(f"evaluating the {args.split} split ({n} x {args.batch_size} images)"),
        tqdm(loader, f"evaluate {args.split}", total=n, unit="batch", disable=args.json) as bar,
        torch.no_grad(),
    ):
        for i, x in enumerate(bar):
            if i >= n:
                break
            bpd = model(x)["bpd"].double()
            total, count = total + bpd.sum().item(), count + bpd.numel()
            bar.set_postfix(bpd=f"{total / count:.4f}")
    result = {
        "bpd": total / max(count, 1),
        "images": count,
        "split": args.split,
        "shards": str(shards),
        "checkpoint": str(folder),
    }
    text = json.dumps(result)
    if args.json_out:
        atomic_write_text(args.json_out, text + "\n")
    print(
        text
        if args.json
        else f"{args.split} bits/dim {result['bpd']:.4f} "
        f"over {count} images ({shards}) from {folder}"
    )
    return 0
