"""`python -m pipeline bench <certificate|data|peer|scaling|train> [options]`: benchmarks that print JSON.

    python -m pipeline bench train                   # a training step per memory mode, ~7 min
    python -m pipeline bench scaling                 # 1 vs 2 DeepSpeed ranks, ~2 min
    python -m pipeline bench data                    # the data loader, ~1 min
    python -m pipeline bench peer --quick            # lipflow against normflows, seconds
    python -m pipeline bench certificate             # the certificate at celebahq-256, ~2 min

Each benchmark has its own options (``python -m pipeline bench train --help``); BENCHMARKS.md has
the numbers and the command lines that made them.
"""

from __future__ import annotations

import argparse
import contextlib

from pipeline.commands import Table, add_subcommands, subcommand

BENCHES: Table = {
    "certificate": (
        "pipeline.bench.certificate",
        "the spectral normalisers' certificate per weight update at a config's architecture, by "
        "stage and group",
    ),
    "data": (
        "pipeline.bench.data",
        "data loader throughput: the streaming loader against a PIL loop and an image-folder "
        "Dataset",
    ),
    "peer": (
        "pipeline.bench.peer",
        "lipflow against normflows' Glow at matched architecture: step time per preset, memory "
        "mode and torch.compile",
    ),
    "scaling": (
        "pipeline.bench.scaling",
        "data-parallel scaling, 1 vs 2 DeepSpeed ranks: images/s and the all-reduce's share of a "
        "step",
    ),
    "train": (
        "pipeline.bench.train",
        "training-step throughput, memory and FLOPs per memory mode, against resolution and depth",
    ),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_subcommands(p, "bench", BENCHES)


def run(args: argparse.Namespace) -> int:
    bench = subcommand(args, "bench", BENCHES)
    del args.bench  # a benchmark's JSON reports its own options (vars(args)), nothing more
    with contextlib.suppress(BrokenPipeError):  # `... | head` is not a failure
        return int(bench.run(args) or 0)
    return 0
