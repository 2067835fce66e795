"""`python -m pipeline study stability`: does the certified flow diverge less than Glow, and what
does it buy where it does not?

Three arms on the same shards (one ``data.cache``, one ``data.seed``) and the same seeds
(``train.seed``: initial weights):

    glow       the unconstrained Glow baseline (the glow preset of pipeline/flows/config.py)
    certified  the model section's defaults (no model override: it follows pipeline/flows/config.py)
    bounded    the bounded preset: bounded blocks without a certificate (pinned to its values)

in cells of a grid (``Cell``): a learning-rate sweep across the divergence transition with gradient
clipping (``train.grad_clip`` at the config's value) and one without it (``train.grad_clip=0``), both
in the config's precision, and bf16 autocast cells (``train.precision=bf16``, with clipping).
Everything else (size, optimiser, warm-up, the divergence guard and its policy) comes from the same
config, so the arms differ by their blocks only. Every run is a `python -m pipeline train` process logging to one MLflow
experiment; a run the guard stops is "diverged", and its ``steps`` are the steps to divergence.

After training, every run that finished gets the exploding-inverse battery (docs/design.md §3.6,
pipeline/theory/battery.py) on its final checkpoint, and every diverged run on its last good one
(the newest complete checkpoint not marked suspect): from the run's summary when the loop put it
there, else from `python -m pipeline probe --checkpoint ... --json-out PATH` (the object it writes).

Outputs in ``--out``: stability.md; stability.csv (one row per arm x cell: divergence rate with its
95% Wilson interval, steps to divergence, val bpd), battery.csv (one row per arm and kind of
checkpoint), runs.csv (one row per run); stability.png (divergence rate and bpd against the learning
rate), battery.png, curves.png; compare/ (``python -m pipeline compare`` on the experiment);
results/ and logs/ per run, runs/ (run folders and mlflow.db), data/ (the shared synthetic shards).

This module is the command (its options, running the plan, a line per run); the rest of the package:

    grid.py      the arms, the cells, the settings (CPU, --quick, --config) and the plan of runs
    battery.py   each run's battery: from its summary or a probe; the headline numbers
    stats.py     Wilson intervals, steps to the first event, the rows of the three tables
    report.py    stability.md, the CSV tables, the tables it prints
    plots.py     stability.png, battery.png, curves.png
"""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.study.report import is_number
from pipeline.study.runner import RunSpec, add_runner_arguments, make_runner
from pipeline.study.stability.battery import OOD, add_battery
from pipeline.study.stability.grid import (
    ARMS,
    CPU,
    FULL,
    GLOW,
    OLD_BOUNDED,
    QUICK,
    Cell,
    Sweep,
    plan,
)
from pipeline.study.stability.report import write_report
from pipeline.study.stability.stats import (
    BATTERY_COLUMNS,
    TABLE_COLUMNS,
    aggregate,
    aggregate_battery,
    first_event_step,
    wilson,
)

__all__ = [  # the command, and the study's pieces as stability.<name> (tests use them)
    "ARMS",
    "BATTERY_COLUMNS",
    "GLOW",
    "OLD_BOUNDED",
    "OOD",
    "TABLE_COLUMNS",
    "Cell",
    "Sweep",
    "add_arguments",
    "add_battery",
    "aggregate",
    "aggregate_battery",
    "first_event_step",
    "plan",
    "run",
    "wilson",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="study folder (runs, results, tables, plots)")
    p.add_argument(
        "--config",
        help="base config (default: the CPU setting on configs/demo.yaml; with --config, its own "
        "size, steps and data, e.g. configs/celebahq-256.yaml)",
    )
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument(
        "--lrs",
        nargs="*",
        type=float,
        help=f"learning rates with clipping (default {CPU.clip_lrs}; none: no such cell)",
    )
    p.add_argument(
        "--noclip-lrs",
        nargs="*",
        type=float,
        help=f"learning rates without clipping (default {CPU.noclip_lrs}; none: no such cell)",
    )
    p.add_argument(
        "--bf16-lrs",
        nargs="*",
        type=float,
        help=f"learning rates in bf16, with clipping (default {CPU.bf16_lrs}; none: no such cell)",
    )
    p.add_argument("--seeds", nargs="+", type=int, help=f"train.seed values (default {CPU.seeds})")
    p.add_argument(
        "--steps", type=int, help=f"train.steps per run (default {CPU.steps}; --quick 12)"
    )
    p.add_argument("--resolution", type=int, help="data.resolution (default 16; --quick 16)")
    p.add_argument("--experiment", default="lipflow-stability", help="MLflow experiment name")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="training processes at once (default 1): runs are single processes, so with "
        "OMP_NUM_THREADS=1 each wants a core of its own",
    )
    p.add_argument("--quick", action="store_true", help="a tiny setting that runs in seconds")
    add_runner_arguments(p)


def resolve_sweep(args: argparse.Namespace) -> Sweep:
    base = QUICK if args.quick else FULL if args.config else CPU

    def given(value, default):
        return tuple(default if value is None else value)

    return Sweep(
        config=args.config or base.config,
        steps=args.steps or base.steps,
        resolution=args.resolution or base.resolution,
        clip_lrs=given(args.lrs, base.clip_lrs),
        noclip_lrs=given(args.noclip_lrs, base.noclip_lrs),
        bf16_lrs=given(args.bf16_lrs, base.bf16_lrs),
        seeds=given(args.seeds, base.seeds),
        overrides=base.overrides,
        probe=base.probe,
    )


def run(args: argparse.Namespace) -> int:
    sweep = resolve_sweep(args)
    if args.jobs < 1:
        print("error: --jobs must be >= 1", file=sys.stderr)
        return 2
    runner = make_runner(args, sweep.config)
    if runner is None:
        return 2
    specs = plan(sweep, args.arms, runner.out, args.experiment, args.overrides)
    if not runner.check(specs):
        return 2
    if args.dry_run:
        runner.print_commands(specs)
        return 0
    start = time.perf_counter()

    def work(spec: RunSpec, slot: int) -> tuple[dict, bool]:
        if args.report_only:
            return runner.find(spec), True
        result, earlier = runner.train(spec, slot)
        if add_battery(runner, spec, result, sweep.probe):
            runner.save(spec, result)
        return result, earlier

    results: list[dict] = [{}] * len(specs)
    fresh = 0
    for done, (i, (result, earlier)) in enumerate(runner.run_all(specs, work, args.jobs), 1):
        results[i] = result
        fresh += not earlier
        print(
            f"[{done}/{len(specs)}] {run_line(result)}" + (" (earlier)" if earlier else ""),
            flush=True,
        )
    wall = time.perf_counter() - start
    write_report(runner.out, sweep, args, results, wall, fresh)
    return 0


def run_line(r: dict) -> str:
    val = r.get("final_val_bpd")
    val_text = f"val bpd {val:.4f}" if is_number(val) else "no val bpd"
    wall = f" in {r['wall_s']:.0f} s" if is_number(r.get("wall_s")) else ""
    battery = r.get("battery")
    probe = (
        f", battery at step {r.get('battery_step')}"
        if battery
        else (", battery failed" if r.get("battery_error") else "")
    )
    return (
        f"{r['name']}: {r['status']} at step {r.get('steps')}{wall}, {val_text}, "
        f"events {sum(r.get('event_counts', {}).values())}, rollbacks {r.get('rollbacks', 0)}, "
        f"skipped {r.get('skipped_steps', 0)}{probe}"
    )
