"""`python -m pipeline shards --src DIR --out DIR --resolution R [...]`: image folder -> tar shards.

What the shards hold and how they are written: pipeline/data/ingest.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.data.ingest import MIN_VAL_SHARDS, SHARD_SIZE, UsageError, write_shards


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", required=True, help="image folder (searched recursively)")
    p.add_argument("--out", required=True, help="output root; shards go to <out>/<resolution>/")
    p.add_argument(
        "--resolution",
        type=int,
        action="append",
        required=True,
        help="output side length; repeat for several (e.g. --resolution 64 --resolution 256)",
    )
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of keys sent to val by a hash of the key (default 0.1)",
    )
    split.add_argument(
        "--val-list",
        help="file with one name per line (relative path, with or "
        "without suffix, or bare file name) that form val",
    )
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="train samples per shard")
    p.add_argument(
        "--val-shard-size",
        type=int,
        default=0,
        help=f"val samples per shard; 0 = fewer when needed to give val {MIN_VAL_SHARDS} shards",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="decode/resize processes (default: all cores)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the write order (shuffles shards' contents; not the split)",
    )
    p.add_argument("--force", action="store_true", help="rewrite even if the manifests are current")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        write_shards(
            args.src,
            args.out,
            args.resolution,
            val_fraction=args.val_fraction,
            val_list=args.val_list,
            shard_size=args.shard_size,
            val_shard_size=args.val_shard_size,
            workers=args.workers,
            seed=args.seed,
            force=args.force,
            quiet=args.quiet,
        )
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
