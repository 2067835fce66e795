"""`python -m pipeline <command>`: the one entry point.

Each command lives in its own module under pipeline/commands with ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so ``--help`` stays fast and
a command never pays for another's imports (deepspeed, mlflow).
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import os
import sys

from pipeline import progress
from pipeline.errors import PipelineError

# name -> one-line help; the command is the module pipeline.commands.<name>.
COMMANDS: dict[str, str] = {
    "train": "train a flow (plain process, deepspeed launcher or torchrun)",
    "sample": "sample a grid of images from a checkpoint",
    "evaluate": "validation bits/dim of a checkpoint on shards",
    "export": "checkpoint -> plain state dict + config (no DeepSpeed)",
    "synth": "write a folder of procedural face-like images",
    "shards": "image folder -> WebDataset tar shards per resolution",
    "model": "print a model summary: parameters, levels, blocks, bounds",
    "plan": "what a run will be on N nodes x G GPUs: batches, DeepSpeed JSON, memory per rank, reads",
    "optimum": "closed-form likelihood optimum of linear flows on shards",
    "bench": "benchmarks that print JSON (data, train, scaling, peer)",
    "compare": "table and plots comparing MLflow runs",
    "study": "reproduce the paper's claims: stability, optimum and cost studies",
    "probe": "exploding-inverse battery on a checkpoint: reconstruction, OOD bpd, samples, gradients",
    "config": "print the resolved config tree (defaults < YAML < overrides)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="lipflow: stable multi-scale normalizing flows, from one CPU to GPU clusters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for name, help_ in COMMANDS.items():
        sub.add_parser(name, help=help_, description=help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher inserts --local_rank=N before the command; ranks come from the environment.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if "--debug" in argv:  # anywhere on the line: tracebacks for expected errors too
        argv.remove("--debug")
        os.environ["LIPFLOW_DEBUG"] = "1"
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the "invalid choice" error and exits
        return 2
    name = argv[0]
    module = importlib.import_module(f"pipeline.commands.{name}")
    sub = argparse.ArgumentParser(prog=f"python -m pipeline {name}", description=COMMANDS[name])
    module.add_arguments(sub)
    try:  # overrides may come before or after options
        args = sub.parse_intermixed_args(argv[1:])
    except TypeError:  # parsers with subcommands (bench, study) cannot intermix
        args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except PipelineError as error:
        if os.environ.get("LIPFLOW_DEBUG", "") not in ("", "0"):
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # once, not once per rank
            print(f"error: {error}", file=sys.stderr, flush=True)
        return error.exit_code


if __name__ == "__main__":
    # A rank that dies in native code (SIGSEGV, SIGABRT from a C++ terminate, ...) prints the Python
    # stack of every thread first: the one clue a week-long job's log will have.
    faulthandler.enable(all_threads=True)
    progress.end_stuck_interrupts()  # Ctrl-C inside a stage ends it within seconds
    sys.exit(main())
