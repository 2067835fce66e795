"""`python -m pipeline study stability`: does the certified flow diverge less than Glow, and what
does it buy where it does not?

Three arms on the same shards (one ``data.cache``, one ``data.seed``) and the same seeds
(``train.seed``: initial weights):

    glow       the unconstrained Glow baseline (the glow preset of pipeline/flows/config.py)
    certified  the model section's defaults (no model override: it follows pipeline/flows/config.py)
    bounded    the bounded preset that was the default before issue 14 (pinned to its values)

in cells of a grid (``Cell``): a learning-rate sweep across the divergence transition with gradient
clipping (``train.grad_clip`` at the config's value) and one without it (``train.grad_clip=0``), both
in the config's precision, and bf16 autocast cells (``train.precision=bf16``, with clipping). Everything else (size, optimiser,
warm-up, the divergence guard and its policy) comes from the same config, so the arms differ by
their blocks only. Every run is a `python -m pipeline train` process logging to one MLflow
experiment; a run the guard stops is "diverged", and its ``steps`` are the steps to divergence.

After training, every run that finished gets the exploding-inverse battery (docs/design.md §3.6,
pipeline/theory/battery.py) on its final checkpoint, and every diverged run on its last good one
(the newest complete checkpoint not marked suspect): from the run's summary when the loop put it
there, else from `python -m pipeline probe --checkpoint ... --json`.

Outputs in ``--out``: stability.md; stability.csv (one row per arm x cell: divergence rate with its
95% Wilson interval, steps to divergence, val bpd), battery.csv (one row per arm and kind of
checkpoint), runs.csv (one row per run); stability.png (divergence rate and bpd against the learning
rate), battery.png, curves.png; compare/ (``python -m pipeline compare`` on the experiment);
results/ and logs/ per run, runs/ (run folders and mlflow.db), data/ (the shared synthetic shards).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import preset_overrides
from pipeline.study.report import is_number, run_compare, write_csv
from pipeline.study.runner import Runner, RunSpec, add_runner_arguments, make_runner, read_jsonl
from pipeline.track.compare import to_markdown

# The glow and bounded presets (pipeline/flows/config.py) key by key, as the study's runs had them.
GLOW = preset_overrides("glow")
OLD_BOUNDED = preset_overrides("bounded")
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "glow": (
        "unconstrained Glow (exp-scale affine coupling, LU 1x1 conv, unbounded actnorm)",
        GLOW,
    ),
    "certified": ("the certified default (the model section's defaults, no override)", ()),
    "bounded": (
        "the old bounded preset (tanh-bounded affine coupling without spectral norm, SVD 1x1 "
        "conv, bounded actnorm: the defaults before issue 14)",
        OLD_BOUNDED,
    ),
}
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class Cell:
    """One training condition of the grid; every arm and seed runs in it."""

    lr: float
    clip: bool  # gradient clipping at the config's train.grad_clip, else train.grad_clip=0
    precision: str | None = None  # train.precision (bf16: autocast subnets); None: the config's

    @property
    def tag(self) -> str:
        return f"lr{self.lr:g}-{'clip' if self.clip else 'noclip'}" + (
            f"-{self.precision}" if self.precision else ""
        )

    @property
    def overrides(self) -> list[str]:
        return [
            f"train.lr={self.lr!r}",
            *([] if self.clip else ["train.grad_clip=0"]),
            *([f"train.precision={self.precision}"] if self.precision else []),
        ]


def cells(clip_lrs=(), noclip_lrs=(), bf16_lrs=()) -> tuple[Cell, ...]:
    """The grid: a sweep with clipping, one without (both in the config's precision), bf16 cells
    (with clipping)."""
    return (
        *(Cell(lr, True) for lr in clip_lrs),
        *(Cell(lr, False) for lr in noclip_lrs),
        *(Cell(lr, True, "bf16") for lr in bf16_lrs),
    )


@dataclass(frozen=True)
class Setting:
    """A base config and what the study adds to it; the command line overrides each field."""

    config: str
    steps: int | None  # None: the config's train.steps
    resolution: int | None  # None: the config's data.resolution
    clip_lrs: tuple[float, ...]
    noclip_lrs: tuple[float, ...]
    bf16_lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()
    probe: tuple[str, ...] = ()  # options of `pipeline probe` (the battery's sizes)

    @property
    def cells(self) -> tuple[Cell, ...]:
        return cells(self.clip_lrs, self.noclip_lrs, self.bf16_lrs)


# CPU-feasible (2 shared cores, about an hour): demo.yaml's 3-level flow on 16x16 faces, narrower
# and with smaller batches; checkpoints every 25 steps are the guard's rollback targets and the last
# good checkpoints the battery probes. Learning rates: 1e-2, where no arm needs the guard (the bpd
# reference), then each sweep straddles the divergence transition, placed by a 1-seed screening
# (docs/studies.md §1).
CPU = Setting(
    config="configs/demo.yaml",
    steps=200,
    resolution=16,
    clip_lrs=(1e-2, 1e-1, 2e-1, 4e-1),
    noclip_lrs=(5e-2, 1e-1, 2e-1),
    bf16_lrs=(1e-1,),
    seeds=(0, 1, 2),
    overrides=(  # demo.yaml's values pinned too, so an edit there does not change the study
        "model.levels=3",
        "model.steps=4",
        "model.width=32",
        "train.micro_batch=16",
        "train.warmup_steps=20",
        "train.grad_clip=1.0",
        "guard.diagnostics_every=100",
        "data.synthetic_train=1024",
        "data.synthetic_val=128",
        "train.log_every=5",
        "train.save_every=25",
        "train.val_every=100",
        "train.samples=16",
    ),
)
# Seconds per run (tests): debug.yaml's tiny flow; lr=10 without clipping diverges within a few
# steps in every arm, and with no rollbacks allowed the guard stops the run at its third bad step.
QUICK = Setting(
    config="configs/debug.yaml",
    steps=12,
    resolution=16,
    clip_lrs=(1e-3,),
    noclip_lrs=(10.0,),
    bf16_lrs=(),
    seeds=(0,),
    overrides=(
        "train.warmup_steps=0",
        "guard.max_rollbacks=0",
        "train.save_every=4",
        "train.log_every=2",
        "train.samples=4",
        "guard.diagnostics_every=6",
        "guard.battery_images=4",
    ),
    probe=("--images", "4", "--samples", "8", "--grad-images", "4"),  # as guard.battery_images=4
)
# --config X: the config's own size, steps and data; the study adds arms, cells and seeds.
# Learning rates have no default that fits every config: give --lrs (and --noclip-lrs, --bf16-lrs).
FULL = Setting(
    config="",
    steps=None,
    resolution=None,
    clip_lrs=CPU.clip_lrs,
    noclip_lrs=(),
    bf16_lrs=(),
    seeds=CPU.seeds,
)
# finished_damaged: trained to the end, but the final battery found non-finite samples or bpd
FINISHED = ("finished", "finished_damaged")
TABULATED = (*FINISHED, "diverged", "failed", "crashed")
PROBED = (*FINISHED, "diverged")  # a battery on the final or on the last good checkpoint

# The battery's headline numbers (metric names of pipeline/theory/battery.py).
OOD = ("negative", "noise_1x", "noise_3x", "noise_10x", "normal", "constant")
SAMPLE_T = ("1.5", "2")

# the battery's numbers per run that the tables show (battery_headline)
BATTERY_HEADLINE = [
    "OOD finite bpd frac",
    "recon err noise 3x",
    "nonfinite samples T1.5",
    "nonfinite samples T2",
    "max abs x T2",
    "grad rel err",
]
RUN_COLUMNS = [
    "run",
    "arm",
    "lr",
    "clip",
    "precision",
    "seed",
    "status",
    "steps",
    "first event step",
    "events",
    "rollbacks",
    "skipped steps",
    "final val bpd",
    "battery step",
    *BATTERY_HEADLINE,
    "wall s",
]
TABLE_COLUMNS = [
    "arm",
    "lr",
    "clip",
    "precision",
    "runs",
    "finished",
    "finished damaged",
    "diverged",
    "crashed",
    "divergence rate",
    "rate lo",
    "rate hi",
    "median steps to divergence",
    "median first event step",
    "runs with events",
    "runs rolled back",
    "events",
    "rollbacks",
    "skipped steps",
    "val bpd mean",
    "val bpd std",
    "val bpd n",
]
BATTERY_COLUMNS = [
    "arm",
    "checkpoints",
    "runs probed",
    "runs with non-finite OOD bpd",
    "OOD finite bpd frac",
    *(f"finite bpd {family}" for family in OOD),
    "median recon err noise 3x",
    *(f"mean nonfinite samples T{t}" for t in SAMPLE_T),
    "median max abs x T2",
    "median grad rel err",
    "max grad rel err",
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


def resolve_setting(args: argparse.Namespace) -> Setting:
    base = QUICK if args.quick else FULL if args.config else CPU

    def given(value, default):
        return tuple(default if value is None else value)

    return Setting(
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


def plan(
    setting: Setting, arms: list[str], out: Path, experiment: str, extra: list[str]
) -> list[RunSpec]:
    """One run per cell x seed x arm; arms alternate, so a partial study stays paired. A run's
    ``precision`` (meta) is its cell's, else the config's."""
    from pipeline.config import load_config
    from pipeline.study.runner import shipped

    common = [
        f"data.cache={(out / 'data').resolve()}",
        f"tracking.experiment={experiment}",
        *([f"data.resolution={setting.resolution}"] if setting.resolution else []),
        *([f"train.steps={setting.steps}"] if setting.steps else []),
        *setting.overrides,
    ]
    config = shipped(setting.config) if setting.config else None
    base_precision = load_config(config, [*common, *extra]).train.precision
    specs = []
    for cell in setting.cells:
        for seed in setting.seeds:
            for arm in arms:
                specs.append(
                    RunSpec(
                        name=f"{arm}-{cell.tag}-seed{seed}",
                        overrides=[
                            *common,
                            *ARMS[arm][1],
                            *cell.overrides,
                            f"train.seed={seed}",
                            *extra,
                        ],
                        meta={
                            "arm": arm,
                            "lr": cell.lr,
                            "clip": cell.clip,
                            "precision": cell.precision or base_precision,
                            "seed": seed,
                        },
                    )
                )
    return specs


def run(args: argparse.Namespace) -> int:
    setting = resolve_setting(args)
    if args.jobs < 1:
        print("error: --jobs must be >= 1", file=sys.stderr)
        return 2
    runner = make_runner(args, setting.config)
    if runner is None:
        return 2
    specs = plan(setting, args.arms, runner.out, args.experiment, args.overrides)
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
        if add_battery(runner, spec, result, setting.probe):
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
    write_report(runner.out, setting, args, results, wall, fresh)
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


# ---- the battery ---------------------------------------------------------------------------------


def add_battery(runner: Runner, spec: RunSpec, result: dict, probe: tuple[str, ...]) -> bool:
    """Put the exploding-inverse battery into a finished or diverged run's ``result`` as
    ``battery`` (flat metrics), with ``battery_source`` and ``battery_step`` (once: a result that
    has a source keeps its battery). Returns whether ``result`` changed.

    Finished: the battery the loop wrote into the summary, else a probe of the final checkpoint.
    Diverged: a probe of its last good checkpoint (``checkpoint.find_good``). A probe that fails is
    recorded as ``battery_error`` (the run's other results stand) and tried again on a rerun.
    """
    from pipeline.train import checkpoint

    if result.get("status") not in PROBED or result.get("battery_source"):
        return False
    if result["status"] in FINISHED and summary_battery(result):
        result["battery"], result["battery_source"] = summary_battery(result), "summary"
        result["battery_step"] = result.get("steps")
        return True
    root = runner.run_dir(spec.name) / "checkpoints"
    if result["status"] in FINISHED:
        folder = Path(result["checkpoint"]) if result.get("checkpoint") else None
        source = "probe of the final checkpoint"
    else:
        folder = checkpoint.find_good(root) if root.is_dir() else None
        source = "probe of the last good checkpoint"
    if folder is None:
        result["battery_error"] = f"no checkpoint to probe under {root}"
        return True
    try:
        out = runner.pipeline(["probe", "--checkpoint", str(folder), "--json", *probe], spec.name)
    except RuntimeError as e:
        result["battery_error"] = str(e)
        return True
    metrics = json.loads(out.strip().splitlines()[-1])
    result["battery"] = {k: as_float(v) for k, v in metrics.items() if k.startswith("battery/")}
    result["battery_source"] = source
    result["battery_checkpoint"] = str(folder)
    result["battery_step"] = checkpoint.step_of(folder)
    result.pop("battery_error", None)
    return True


def summary_battery(result: dict) -> dict[str, float]:
    """The battery metrics a summary holds, flat (``battery/...`` keys) or under ``battery``."""
    nested = result.get("battery") if isinstance(result.get("battery"), dict) else {}
    flat = {k: v for k, v in {**result, **nested}.items() if k.startswith("battery/")}
    return {k: as_float(v) for k, v in flat.items()}


def as_float(v) -> float:
    """A metric as written by json_safe (non-finite floats as "nan"/"inf" strings)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def battery_headline(b: dict | None) -> dict:
    """One run's battery, in the numbers the tables show (None where it has no battery)."""
    names = [*BATTERY_HEADLINE, *(f"finite bpd {family}" for family in OOD)]
    if not b:
        return dict.fromkeys(names)
    b = {k: as_float(v) for k, v in b.items()}  # a result file holds non-finite values as strings
    finite = {f: b.get(f"battery/{f}/finite_frac", math.nan) for f in OOD}
    return {
        "OOD finite bpd frac": statistics.fmean(finite.values()),
        "recon err noise 3x": b.get("battery/noise_3x/recon_error", math.nan),
        "nonfinite samples T1.5": b.get("battery/sample_T1.5/nonfinite_frac", math.nan),
        "nonfinite samples T2": b.get("battery/sample_T2/nonfinite_frac", math.nan),
        "max abs x T2": b.get("battery/sample_T2/max_abs", math.nan),
        "grad rel err": b.get("battery/invertible_grad_rel_error", math.nan),
        **{f"finite bpd {f}": v for f, v in finite.items()},
    }


# ---- aggregation ---------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials (95% by default; (0, 1) for n = 0).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at k = 0 or k = n, which
    is where a few seeds a cell always land: 0 of 3 gives [0, 0.56], 3 of 3 gives [0.44, 1].
    """
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # k = 0 and k = n touch 0 and 1 exactly (rounding would leave 1 - 1e-16: a negative error bar)
    return (0.0 if k == 0 else center - half), (1.0 if k == n else center + half)


def first_event_step(r: dict) -> int | None:
    """The step of the run's first guard event: from its events.jsonl, else its summary's
    ``last_events`` (a diverged run's), else None (no event)."""
    rows = read_jsonl(Path(r.get("run_dir", "")) / "events.jsonl") if r.get("run_dir") else []
    steps = [row["step"] for row in rows + list(r.get("last_events") or []) if is_step(row)]
    return min(steps) if steps else None


def is_step(row) -> bool:
    return isinstance(row, dict) and isinstance(row.get("step"), int)


def cell_of(r: dict) -> tuple:
    s = r["study"]
    return s["arm"], float(s["lr"]), bool(s.get("clip", True)), s.get("precision", "fp32")


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def aggregate(results: list[dict]) -> list[dict]:
    """One row per (arm, lr, clip, precision), in first-seen order, over the runs that ended (see
    TABULATED).

    The divergence rate is diverged / (finished + diverged) with its 95% Wilson interval (a
    crashed or failed run is neither, and is counted apart); steps to divergence are the steps a
    diverged run had made when the guard stopped it; events, rollbacks and skipped steps are totals;
    a finished run that was rolled back is one the guard rescued (at a cut learning rate); the final
    val bpd is the mean and sample standard deviation over the runs that finished with a finite
    value (``val bpd n`` of them).
    """
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r.get("status") in TABULATED:
            groups.setdefault(cell_of(r), []).append(r)
    rows = []
    for (arm, lr, clip, precision), runs in groups.items():
        status = [r["status"] for r in runs]
        finished = sum(s in FINISHED for s in status)
        diverged, damaged = status.count("diverged"), status.count("finished_damaged")
        lo, hi = wilson(diverged, finished + diverged)
        events = [sum(r.get("event_counts", {}).values()) for r in runs]
        firsts = [s for s in map(first_event_step, runs) if s is not None]
        vals = [
            r["final_val_bpd"]
            for r in runs
            if r["status"] in FINISHED and is_number(r.get("final_val_bpd"))
        ]
        rows.append(
            {
                "arm": arm,
                "lr": lr,
                "clip": clip,
                "precision": precision,
                "runs": len(runs),
                "finished": finished,
                "finished damaged": damaged,
                "diverged": diverged,
                "crashed": len(runs) - finished - diverged,
                "divergence rate": diverged / (finished + diverged)
                if finished + diverged
                else None,
                "rate lo": lo,
                "rate hi": hi,
                "median steps to divergence": median_or_none(
                    [int(r.get("steps", 0)) for r in runs if r["status"] == "diverged"]
                ),
                "median first event step": median_or_none(firsts),
                "runs with events": sum(e > 0 for e in events),
                "runs rolled back": sum(int(r.get("rollbacks", 0)) > 0 for r in runs),
                "events": sum(events),
                "rollbacks": sum(int(r.get("rollbacks", 0)) for r in runs),
                "skipped steps": sum(int(r.get("skipped_steps", 0)) for r in runs),
                "val bpd mean": statistics.fmean(vals) if vals else None,
                "val bpd std": statistics.stdev(vals) if len(vals) > 1 else None,
                "val bpd n": len(vals),
            }
        )
    return rows


def aggregate_battery(results: list[dict]) -> list[dict]:
    """One row per arm and kind of checkpoint ("final" of finished runs, "last good" of diverged
    ones), over the runs that have a battery, across all cells.

    Per run: OOD finite bpd frac is the mean over the off-data families of the fraction of images
    with a finite bpd, and a run "has non-finite OOD bpd" when any family's fraction is below 1.
    Across runs: fractions are means, errors and magnitudes medians (a few runs' overflow to 1e300
    would swamp a mean), and the largest gradient error is shown too.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        if r.get("battery") and r.get("status") in PROBED:
            kind = "final" if r["status"] in FINISHED else "last good"
            groups.setdefault((r["study"]["arm"], kind), []).append(battery_headline(r["battery"]))
    order = sorted(groups, key=lambda g: (list(ARMS).index(g[0]), g[1]))
    return [battery_row(arm, kind, groups[(arm, kind)]) for arm, kind in order]


def battery_row(arm: str, kind: str, heads: list[dict]) -> dict:
    """aggregate_battery's row for runs whose battery headlines are ``heads``."""

    def values(name: str) -> list[float]:
        return [h[name] for h in heads if not math.isnan(h[name])]

    def mean(name: str) -> float | None:
        v = values(name)
        return statistics.fmean(v) if v else None

    def median(name: str) -> float | None:
        return median_or_none(values(name))

    grads = values("grad rel err")
    return {
        "arm": arm,
        "checkpoints": kind,
        "runs probed": len(heads),
        "runs with non-finite OOD bpd": sum(
            any(h[f"finite bpd {f}"] < 1 for f in OOD) for h in heads
        ),
        "OOD finite bpd frac": mean("OOD finite bpd frac"),
        **{f"finite bpd {f}": mean(f"finite bpd {f}") for f in OOD},
        "median recon err noise 3x": median("recon err noise 3x"),
        **{f"mean nonfinite samples T{t}": mean(f"nonfinite samples T{t}") for t in SAMPLE_T},
        "median max abs x T2": median("max abs x T2"),
        "median grad rel err": median("grad rel err"),
        "max grad rel err": max(grads) if grads else None,
    }


def run_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        counts, s = r.get("event_counts", {}), r["study"]
        head = battery_headline(r.get("battery"))
        rows.append(
            {
                "run": r["name"],
                "arm": s["arm"],
                "lr": f"{s['lr']:g}",
                "clip": s.get("clip", True),
                "precision": s.get("precision", "fp32"),
                "seed": s["seed"],
                "status": r["status"],
                "steps": r.get("steps"),
                "first event step": first_event_step(r),
                "events": ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "0",
                "rollbacks": r.get("rollbacks", 0),
                "skipped steps": r.get("skipped_steps", 0),
                "final val bpd": r.get("final_val_bpd"),
                "battery step": r.get("battery_step"),
                **{k: head[k] for k in RUN_COLUMNS if k in head},
                "wall s": round(r["wall_s"]) if is_number(r.get("wall_s")) else None,
            }
        )
    return rows


# ---- outputs -------------------------------------------------------------------------------------


def write_report(
    out: Path,
    setting: Setting,
    args: argparse.Namespace,
    results: list[dict],
    wall: float,
    fresh: int,
) -> None:
    rows = aggregate(results)
    battery = aggregate_battery(results)
    per_run = run_rows(results)
    write_csv(out / "stability.csv", TABLE_COLUMNS, rows)
    write_csv(out / "battery.csv", BATTERY_COLUMNS, battery)
    write_csv(out / "runs.csv", RUN_COLUMNS, per_run)
    plot = plot_stability(rows, results, out / "stability.png")
    battery_plot = plot_battery(results, out / "battery.png")
    curves = plot_curves(results, out / "curves.png")
    compare = run_compare(out, args.experiment, results)
    pending = [r["name"] for r in results if r.get("status") not in TABULATED]
    unprobed = [r["name"] for r in results if r.get("status") in PROBED and not r.get("battery")]
    run_walls = [r["wall_s"] for r in results if is_number(r.get("wall_s"))]
    lines = [
        "# Stability study: Glow, the certified default and the old bounded preset",
        "",
        f"- config: `{setting.config}`"
        + (f", resolution {setting.resolution}" if setting.resolution else "")
        + (f", {setting.steps} steps" if setting.steps else ""),
        f"- study overrides: `{' '.join(setting.overrides + tuple(args.overrides)) or '-'}`",
        f"- cells: {', '.join(c.tag for c in setting.cells)}; seeds "
        f"{', '.join(map(str, setting.seeds))}; MLflow experiment `{args.experiment}`",
        *(f"- {arm}: {ARMS[arm][0]}, `{' '.join(ARMS[arm][1]) or '-'}`" for arm in args.arms),
        f"- wall time: {wall:.0f} s for this invocation ({args.jobs} at once), which trained "
        f"{fresh} of the {len(results)} runs; {sum(run_walls):.0f} s summed over the runs' own "
        "wall times (training and battery)",
        *([f"- not finished yet: {', '.join(pending)}"] if pending else []),
        *([f"- no battery: {', '.join(unprobed)}"] if unprobed else []),
        "",
        "## Divergence per arm and cell",
        "",
        "Divergence rate: diverged / (finished + diverged), [95% Wilson interval]; steps to "
        "divergence: where the guard stopped a diverged run (median); finished damaged: runs "
        "that trained to the end but whose final battery found non-finite samples or bpd (they "
        "count as finished); val bpd: mean ± sample std over the runs that finished (n of them).",
        "",
        to_markdown(*display_table(rows)),
        "## Exploding-inverse battery per arm",
        "",
        "final: the finished runs' last checkpoints; last good: the diverged runs' newest good "
        "checkpoint. Fractions are means over runs, errors and magnitudes medians.",
        "",
        to_markdown(*display_battery(battery)),
        "## Runs",
        "",
        to_markdown(RUN_COLUMNS, [{k: fmt(v) for k, v in r.items()} for r in per_run]),
        "## Plots",
        "",
        *(["![stability](stability.png)", ""] if plot else []),
        *(["![battery](battery.png)", ""] if battery_plot else []),
        *(["![curves](curves.png)", ""] if curves else []),
        *(f"![{p.stem}](compare/{p.name})\n" for p in compare),
        *(
            ["Every run, all metrics: [compare/compare.md](compare/compare.md)", ""]
            if compare
            else []
        ),
    ]
    (out / "stability.md").write_text("\n".join(lines))
    print("\n" + to_markdown(*display_table(rows)))
    print(to_markdown(*display_battery(battery)))
    print(
        f"wrote {out / 'stability.md'}, {out / 'stability.csv'}, {out / 'battery.csv'}, "
        f"{out / 'runs.csv'}"
    )


def fmt(v) -> str:
    """A table cell: '-' for nothing, 4 significant digits for a float."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def display_table(rows: list[dict]) -> tuple[list[str], list[dict]]:
    columns = [
        "arm",
        "lr",
        "clip",
        "precision",
        "runs",
        "diverged",
        "divergence rate [95% CI]",
        "finished damaged",
        "crashed",
        "median steps to divergence",
        "median first event step",
        "runs with events",
        "runs rolled back",
        "rollbacks",
        "skipped steps",
        "val bpd (finished)",
    ]
    shown = []
    for row in rows:
        mean, std, n = row["val bpd mean"], row["val bpd std"], row["val bpd n"]
        text = "-" if mean is None else f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")
        rate = row["divergence rate"]
        shown.append(
            {
                **{k: fmt(v) for k, v in row.items()},
                "lr": f"{row['lr']:g}",
                "clip": "yes" if row["clip"] else "no",
                "divergence rate [95% CI]": "-"
                if rate is None
                else f"{rate:.2f} [{row['rate lo']:.2f}, {row['rate hi']:.2f}]",
                "median steps to divergence": fmt(row["median steps to divergence"]),
                "val bpd (finished)": f"{text} (n={n})",
            }
        )
    return columns, shown


def display_battery(rows: list[dict]) -> tuple[list[str], list[dict]]:
    columns = [
        "arm",
        "checkpoints",
        "runs probed",
        "runs with non-finite OOD bpd",
        "OOD finite bpd frac",
        "finite bpd noise_3x",
        "finite bpd normal",
        "median recon err noise 3x",
        "mean nonfinite samples T1.5",
        "mean nonfinite samples T2",
        "median max abs x T2",
        "median grad rel err",
        "max grad rel err",
    ]
    return columns, [{k: fmt(v) for k, v in row.items()} for row in rows]


def plot_stability(rows: list[dict], results: list[dict], path: Path) -> bool:
    """Divergence rate (95% Wilson interval) and final val bpd against the learning rate, with and
    without clipping; one colour per arm, bf16 cells as open squares beside the fp32 ones."""
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    colors = {arm: matplotlib.colormaps["tab10"](i) for i, arm in enumerate(arms)}
    panels = [clip for clip in (True, False) if any(r["clip"] == clip for r in rows)]
    fig, axes = plt.subplots(
        2, len(panels), figsize=(5.5 * len(panels), 6.5), sharex="col", squeeze=False
    )
    for col, clip in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        for k, arm in enumerate(arms):
            shift = 1.0 + 0.07 * (k - (len(arms) - 1) / 2)  # side by side on the log axis
            for precision, marker, fill in (("fp32", "o", None), ("bf16", "s", "none")):
                mine = sorted(
                    (
                        r
                        for r in rows
                        if r["arm"] == arm and r["clip"] == clip and r["precision"] == precision
                    ),
                    key=lambda r: r["lr"],
                )
                mine = [r for r in mine if r["divergence rate"] is not None]
                if not mine:
                    continue
                x = [r["lr"] * shift * (1.04 if precision == "bf16" else 1.0) for r in mine]
                y = [r["divergence rate"] for r in mine]
                err = [
                    [max(0.0, r["divergence rate"] - r["rate lo"]) for r in mine],
                    [max(0.0, r["rate hi"] - r["divergence rate"]) for r in mine],
                ]
                top.errorbar(
                    x,
                    y,
                    yerr=err,
                    fmt=marker + ("-" if precision == "fp32" else ""),
                    color=colors[arm],
                    mfc=fill,
                    capsize=3,
                    label=f"{arm}" + (" (bf16)" if precision == "bf16" else ""),
                )
                means = [(xi, r) for xi, r in zip(x, mine) if r["val bpd mean"] is not None]
                if means:
                    bottom.errorbar(
                        [xi for xi, _ in means],
                        [r["val bpd mean"] for _, r in means],
                        yerr=[r["val bpd std"] or 0.0 for _, r in means],
                        fmt=marker + ("-" if precision == "fp32" else ""),
                        color=colors[arm],
                        mfc=fill,
                        capsize=3,
                    )
        top.set_ylim(-0.05, 1.05)
        top.set_ylabel("divergence rate (95% Wilson)")
        top.set_title("with gradient clipping" if clip else "without gradient clipping")
        top.legend(fontsize=7)
        bottom.set_ylabel("final val bpd (finished runs)")
        bottom.set_xlabel("learning rate")
        bottom.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_battery(results: list[dict], path: Path) -> bool:
    """The battery per arm: the fraction of off-data images with a finite bpd per family, the
    fraction of non-finite samples per temperature, and per run the reconstruction error on 3x
    noise and the invertible-gradient error (o: finished runs, x: diverged runs' last good)."""
    probed = [r for r in results if r.get("battery") and r.get("status") in PROBED]
    if not probed:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if any(r["study"]["arm"] == a for r in probed)]
    colors = {arm: matplotlib.colormaps["tab10"](i) for i, arm in enumerate(arms)}
    finished = [r for r in probed if r["status"] in FINISHED] or probed
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(arms)
    temps = sorted(
        {
            k.split("/")[1][len("sample_T") :]
            for r in probed
            for k in r["battery"]
            if "sample_T" in k
        },
        key=float,
    )
    for k, arm in enumerate(arms):
        mine = [r["battery"] for r in finished if r["study"]["arm"] == arm]
        if not mine:
            continue
        frac = [
            statistics.fmean(as_float(b.get(f"battery/{f}/finite_frac")) for b in mine) for f in OOD
        ]
        axes[0].bar(
            [i + k * width for i in range(len(OOD))], frac, width, color=colors[arm], label=arm
        )
        nonfinite = [
            statistics.fmean(as_float(b.get(f"battery/sample_T{t}/nonfinite_frac")) for b in mine)
            for t in temps
        ]
        axes[1].plot([float(t) for t in temps], nonfinite, "o-", color=colors[arm], label=arm)
    for k, arm in enumerate(arms):
        for r in probed:
            if r["study"]["arm"] != arm:
                continue
            b = r["battery"]
            x = k + (0.15 if r["status"] == "diverged" else -0.15)
            marker = "x" if r["status"] == "diverged" else "o"
            for value, color in (
                (b.get("battery/noise_3x/recon_error"), colors[arm]),
                (b.get("battery/invertible_grad_rel_error"), "grey"),
            ):
                value = as_float(value)
                if math.isfinite(value) and value > 0:
                    axes[2].plot(x, value, marker, color=color, alpha=0.7)
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(OOD))], OOD, fontsize=8)
    axes[0].set_ylabel("fraction of images with finite bpd")
    axes[0].set_title("off-data inputs (finished runs, mean)")
    axes[0].set_ylim(0, 1.05)
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("sampling temperature T")
    axes[1].set_ylabel("fraction of non-finite samples")
    axes[1].set_title("samples (finished runs, mean)")
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].legend(fontsize=7)
    axes[2].set_yscale("log")
    axes[2].set_xticks(range(len(arms)), arms)
    axes[2].set_title(
        "per run: recon error on 3x noise (colour), invertible-grad\n"
        "rel. error (grey); o finished, x diverged (last good)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_curves(results: list[dict], path: Path) -> bool:
    """Train bpd against step, one panel per cell, one colour per arm, one line per seed; an x
    where the guard stopped a run (its curve's last logged point)."""
    curves = {}
    for r in results:
        rows = read_jsonl(Path(r.get("run_dir", "")) / "metrics.jsonl") if r.get("run_dir") else []
        points = [
            (row["step"], row["train/bpd"]) for row in rows if is_number(row.get("train/bpd"))
        ]
        if points:
            curves[r["name"]] = (r, points)
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(cell_of(r)[1:] for r, _ in curves.values()))
    arms = list(dict.fromkeys(r["study"]["arm"] for r, _ in curves.values()))
    colors = {arm: matplotlib.colormaps["tab10"](i) for i, arm in enumerate(arms)}
    cols = min(3, len(keys))
    rows_n = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.0 * rows_n), squeeze=False)
    finals = [p[-1][1] for r, p in curves.values() if r["status"] in FINISHED]
    starts = [p[0][1] for _, p in curves.values()]
    low = min(finals or starts) - 0.1
    high = max(starts) + 0.2  # a diverging curve leaves the frame; its x marks where it stopped
    for ax, key in zip(axes.flat, keys):
        for r, points in curves.values():
            if cell_of(r)[1:] != key:
                continue
            c = colors[r["study"]["arm"]]
            ax.plot(*zip(*points), color=c, lw=1, alpha=0.8)
            if r["status"] not in FINISHED:
                ax.plot(points[-1][0], min(points[-1][1], high), "x", color=c, ms=9, mew=2)
        lr, clip, precision = key
        ax.set_title(f"lr {lr:g}, {'clip' if clip else 'no clip'}, {precision}", fontsize=9)
        ax.set_ylim(low, high)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("train bpd", fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[a], label=a) for a in arms]
    handles.append(
        plt.Line2D([], [], color="grey", marker="x", ls="", label="stopped by the guard")
    )
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
