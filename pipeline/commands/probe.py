"""`python -m pipeline probe --checkpoint RUN [--json] [--json-out PATH]`: the exploding-inverse
battery on a checkpoint.

Reconstruction error and finiteness of bpd on validation images and off-data inputs, samples at
several temperatures, and invertible-mode gradients against stored activations
(pipeline/theory/battery.py has the metrics and what each one means). One process, no DeepSpeed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from pipeline import progress
from pipeline.data import ShardError, build_loader, prepare_synthetic, resolve_shards
from pipeline.io import atomic_write_text, json_safe
from pipeline.theory.battery import TEMPERATURES, exploding_inverse_battery
from pipeline.train.inference import open_checkpoint, restore_model

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run folder (its latest complete checkpoint) or checkpoint step folder",
    )
    p.add_argument("--shards", help="shards folder for the val images (default: the run's data)")
    p.add_argument("--images", type=int, default=16, help="images per input family")
    p.add_argument("--samples", type=int, default=32, help="samples per temperature")
    p.add_argument("--grad-images", type=int, default=8, help="val images of the gradient check")
    p.add_argument(
        "--temperatures",
        type=parse_floats,
        default=TEMPERATURES,
        help="comma-separated sampling temperatures (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float64",
        help="dtype of the reconstruction, bpd and sampling probes (gradients: float32)",
    )
    p.add_argument(
        "--no-gradients", action="store_true", help="skip the memory-mode gradient check"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument(
        "--json-out",
        metavar="PATH",
        help="also write that JSON object to PATH (atomically): what a caller reads as its result",
    )


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one temperature")
    return values


def run(args: argparse.Namespace) -> int:
    if min(args.images, args.samples, args.grad_images) < 1:
        print("error: --images, --samples and --grad-images must be >= 1", file=sys.stderr)
        return 2
    try:
        folder, cfg = open_checkpoint(args.checkpoint, progress.stage)
        # before the model: missing images fail at once
        x_val = val_images(cfg.data, args.shards, max(args.images, args.grad_images))
        model = restore_model(folder, cfg, stage=progress.stage)
    except (FileNotFoundError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = exploding_inverse_battery(
        model,
        x_val,
        temperatures=args.temperatures,
        n_images=args.images,
        n_samples=args.samples,
        n_grad=args.grad_images,
        seed=args.seed,
        dtype=DTYPES[args.dtype],
        gradients=not args.no_gradients,
        stage=progress.stage,
    )
    result = json.dumps(json_safe({"checkpoint": str(folder), **metrics}))
    if args.json_out:
        atomic_write_text(args.json_out, result + "\n")
    if args.json:
        print(result)
    else:
        print(f"exploding-inverse battery of {folder} ({args.dtype}; gradients float32)")
        print(format_table(metrics))
    return 0


def val_images(data, shards: str | None, n: int) -> torch.Tensor:
    """The first n images of the val split the run's config names (or of `shards`)."""
    if shards:
        data = dataclasses.replace(data, source="shards", shards=shards)
    if data.source == "synthetic":
        prepare_synthetic(data)  # a pure function of the config: rebuilt if the cache is gone
    loader = build_loader(data, resolve_shards(data), "val", n, rank=0, world_size=1)
    return next(iter(loader))[:n]


def format_table(metrics: dict[str, float]) -> str:
    """Families as rows and their metrics as columns; samples and gradients below."""
    rows: dict[str, dict[str, float]] = {}
    rest = {}
    for name, value in metrics.items():
        parts = name.split("/")
        if len(parts) == 3:
            rows.setdefault(parts[1], {})[parts[2]] = value
        else:
            rest[name] = value
    lines = []
    for group in (
        {k: v for k, v in rows.items() if not k.startswith("sample_")},
        {k: v for k, v in rows.items() if k.startswith("sample_")},
    ):
        if not group:
            continue
        columns = list(next(iter(group.values())))
        width = max(len(k) for k in group)
        lines.append(" ".join([" " * width, *(f"{c:>17}" for c in columns)]))
        for key, values in group.items():
            cells = (f"{values.get(c, float('nan')):>17.4g}" for c in columns)
            lines.append(" ".join([f"{key:<{width}}", *cells]))
        lines.append("")
    lines += [f"{name}: {value:.4g}" for name, value in rest.items()]
    return "\n".join(lines).rstrip()
