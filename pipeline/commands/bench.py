"""`python -m pipeline bench <name> [args]`: run the benchmark pipeline/bench/<name>.py (prints JSON)."""

from __future__ import annotations

import argparse
import contextlib
import importlib

from pipeline.bench import NAMES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=NAMES, help="benchmark: " + ", ".join(NAMES))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")


def run(args: argparse.Namespace) -> int:
    bench = importlib.import_module(f"pipeline.bench.{args.name}")
    with contextlib.suppress(BrokenPipeError):  # `... | head` is not a failure
        return int(bench.main(args.args) or 0)
    return 0
