"""`python -m pipeline optimum`: closed-form linear-flow optimum of a shard folder (docs/design.md §3.2).

    python -m pipeline optimum --shards data/32 [--squeeze 2] [--mode pooled|per_image] [--n-bits 5]
                               [--split train] [--limit N] [--no-centered] [--hflip] [--json]

Streams the shards once (R in float64, images never held), integrates the dequantisation noise
exactly and prints the optimum in nats and bits/dim; an unbounded optimum is printed with its
reason.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from pipeline.data import iter_levels
from pipeline.theory.closed_form import MODES, Optimum, optimal_nll


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="a shard folder (holding manifest.json)")
    parser.add_argument("--squeeze", type=int, default=2, help="squeeze factor s (c = 3·s²)")
    parser.add_argument("--mode", choices=MODES, default="pooled")
    parser.add_argument("--n-bits", type=int, default=5, help="bits per colour value (data.n_bits)")
    parser.add_argument("--split", default="train", help="shard prefix: train or val")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many images")
    parser.add_argument("--batch-size", type=int, default=64, help="images decoded per step")
    parser.add_argument(
        "--centered",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="subtract the mean position vector (the flow has a free bias, e.g. actnorm)",
    )
    parser.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="weigh each image and its mirror equally, as a loader with data.hflip=true trains on",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        batches = iter_levels(
            args.shards, args.n_bits, split=args.split, batch_size=args.batch_size, limit=args.limit
        )
        result = optimal_nll(
            batches,
            n_bits=args.n_bits,
            squeeze=args.squeeze,
            mode=args.mode,
            centered=args.centered,
            hflip=args.hflip,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"optimum: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), allow_nan=False))
    else:
        print(format_optimum(result, args.shards))
    return 0


def format_optimum(r: Optimum, source: str = "") -> str:
    c, h, w = r.image_shape
    lines = [
        "closed-form optimum of linear per-position flows (docs/design.md §3.2)",
        f"  data       {source} ({r.num_images} images, {c}x{h}x{w}, {r.n_bits}-bit)",
        f"  squeeze    {r.squeeze}: N = {r.positions} positions x c = {r.channels} channels, "
        + ("centred (free bias)" if r.centered else "not centred"),
        f"  mode       {r.mode}" + (", each image with its mirror (hflip)" if r.hflip else ""),
    ]
    if r.bounded:
        lines += [
            f"  NLL        {r.nll:.6g} nats/image = {r.nll_per_dim:.6f} nats/dim",
            f"  bpd        {r.bpd:.6f}",
        ]
    else:
        lines += [f"  NLL        {-math.inf} (unbounded): {r.reason}"]
    return "\n".join(lines)
