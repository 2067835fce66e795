"""`python -m pipeline plan --config X [--nodes N --gpus-per-node G --gpu-memory 80GiB] [a.b=v]`:
what the run will be, without training: batch arithmetic, DeepSpeed's JSON, bytes per rank
(model states under ZeRO, activations measured per memory mode on the CPU), the peak against the
GPU's memory with a verdict, the shards and the read rate they need (pipeline/train/plan.py).
Prints a line per stage while it measures, then the plan; writes it as JSON."""

from __future__ import annotations

import argparse
import json
import re
import sys

from pipeline.config import add_config_arguments, config_from_args
from pipeline.io import atomic_write_text
from pipeline.train.plan import format_plan, make_plan

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS.update({f"{p}iB": 2 ** (10 * i) for i, p in enumerate("KMGT", start=1)})


def byte_size(text: str) -> int:
    """'80GiB', '80GB', '81920MiB', '85899345920' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B?)\s*", text)
    if not match or match.group(2) not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 80GiB or 40GB")
    return round(float(match.group(1)) * UNITS[match.group(2)])


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="ranks per node (default 1)")
    p.add_argument(
        "--gpu-memory", type=byte_size, default="80GiB", help="memory per GPU (default 80GiB)"
    )
    p.add_argument(
        "--step-time",
        type=float,
        default=1.0,
        help="assumed seconds per optimizer step, for the read rate (default 1)",
    )
    p.add_argument("--out", help="JSON file to write (default: <run folder>/plan.json)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the summary")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if args.step_time <= 0:
        print("error: --step-time must be positive (seconds per step)", file=sys.stderr)
        return 2
    plan = make_plan(
        cfg,
        args.nodes,
        args.gpus_per_node,
        args.gpu_memory,
        args.step_time,
        say=lambda line: print(f"plan: {line}", file=sys.stderr, flush=True),
    )
    out = args.out or cfg.run.dir / "plan.json"
    atomic_write_text(out, json.dumps(plan, indent=1) + "\n")
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan, out))
    return 0
