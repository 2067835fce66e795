"""Benchmarks that print JSON (`python -m pipeline bench <name>`); BENCHMARKS.md has the numbers.

Measurements, never timed assertions: the slow tests only check that each prints valid JSON. Each
module has ``add_arguments(parser)`` and ``run(args) -> int``, as the commands and the studies do
(pipeline/commands/bench.py lists them); ``common`` holds what they share. ``standalone`` runs one
as ``python -m pipeline.bench.<name>``, the way the benchmarks start their worker processes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def standalone(
    name: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None = None,
) -> int:
    """`python -m pipeline.bench.<name> [args]`: the benchmark with the options of `python -m
    pipeline bench <name>`, without the entry point's dispatch."""
    p = argparse.ArgumentParser(prog=f"python -m pipeline bench {name}", description=description)
    add_arguments(p)
    return int(run(p.parse_args(argv)) or 0)
