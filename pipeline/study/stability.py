"""`python -m pipeline study stability`: does the Lipschitz-bounded flow diverge less than Glow?

Two arms on the same shards (one ``data.cache``, one ``data.seed``) and the same seeds (``train.seed``:
initial weights), at each learning rate:

    glow     the unconstrained Glow baseline: coupling=affine_exp conv=lu actnorm=unbounded
    bounded  the bi-Lipschitz flow of DESIGN §3.4: coupling=affine conv=svd actnorm=bounded

Everything else (size, optimiser, warm-up, gradient clipping, the divergence guard and its policy)
comes from the same config, so an arm differs from the other by its blocks only. Every run is a
`python -m pipeline train` process logging to one MLflow experiment; a run the guard stops
(DivergenceStop) is recorded as "diverged". The claim under test: at equal learning rate the bounded
flow has fewer divergence events, rollbacks and stopped runs, for a small cost in final bpd.

Outputs in ``--out``: stability.md and stability.csv (one row per arm x learning rate), runs.csv (one
row per run), stability.png, compare/ (``python -m pipeline compare`` on the experiment: its table
and bpd, balance, gradient-norm and Lipschitz plots), results/ and logs/ per run, runs/ (run folders
and mlflow.db), data/ (the shared synthetic shards).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.study.report import is_number, run_compare, write_csv
from pipeline.study.runner import RunSpec, add_runner_arguments, make_runner, read_jsonl
from pipeline.track.compare import to_markdown

ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "glow": (
        "unconstrained Glow (exp-scale affine coupling, LU 1x1 conv, unbounded actnorm)",
        ("model.coupling=affine_exp", "model.conv=lu", "model.actnorm=unbounded"),
    ),
    "bounded": (
        "Lipschitz-bounded (tanh-bounded affine coupling, SVD 1x1 conv, bounded actnorm)",
        ("model.coupling=affine", "model.conv=svd", "model.actnorm=bounded"),
    ),
}


@dataclass(frozen=True)
class Setting:
    """A base config and what the study adds to it; the command line overrides each field."""

    config: str
    steps: int | None  # None: the config's train.steps
    resolution: int | None  # None: the config's data.resolution
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()


# CPU-feasible (2 shared cores, ~15-20 minutes for 16 runs): demo.yaml's 3-level flow on 16x16 faces,
# narrower and with smaller batches; checkpoints every 50 steps are the guard's rollback targets. The
# learning rates span the comfortable (3e-3) to the certainly divergent (1e-1) for this size.
CPU = Setting(
    config="configs/demo.yaml",
    steps=300,
    resolution=16,
    lrs=(3e-3, 1e-2, 3e-2, 1e-1),
    seeds=(0, 1),
    overrides=(  # demo.yaml's values pinned too, so an edit there does not change the study
        "model.levels=3",
        "model.steps=4",
        "model.width=32",
        "train.micro_batch=16",
        "train.warmup_steps=20",
        "guard.diagnostics_every=100",
        "data.synthetic_train=1024",
        "data.synthetic_val=128",
        "train.log_every=5",
        "train.save_every=50",
        "train.val_every=100",
        "train.samples=16",
    ),
)
# Seconds per run (tests): debug.yaml's tiny flow; lr=10 diverges within a few steps in both arms,
# and with no rollbacks allowed the guard stops the run at its third bad step.
QUICK = Setting(
    config="configs/debug.yaml",
    steps=12,
    resolution=16,
    lrs=(1e-3, 10.0),
    seeds=(0,),
    overrides=(
        "train.warmup_steps=0",
        "guard.max_rollbacks=0",
        "train.save_every=4",
        "train.log_every=2",
        "train.samples=4",
        "guard.diagnostics_every=6",
    ),
)
# --config X: the config's own size, steps and data; the study adds arms, learning rates and seeds.
TABULATED = ("finished", "diverged", "failed", "crashed")
FULL = Setting(config="", steps=None, resolution=None, lrs=CPU.lrs, seeds=CPU.seeds)

RUN_COLUMNS = [
    "run",
    "arm",
    "lr",
    "seed",
    "status",
    "steps",
    "events",
    "rollbacks",
    "skipped steps",
    "final val bpd",
    "wall s",
]
TABLE_COLUMNS = [
    "arm",
    "lr",
    "runs",
    "finished",
    "diverged",
    "crashed",
    "runs with events",
    "events",
    "rollbacks",
    "skipped steps",
    "mean steps",
    "val bpd mean",
    "val bpd std",
    "val bpd n",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="study folder (runs, results, tables, plots)")
    p.add_argument(
        "--config",
        help="base config (default: the CPU setting on configs/demo.yaml; with --config, its own "
        "size, steps and data, e.g. configs/celebahq-256.yaml)",
    )
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--lrs", nargs="+", type=float, help=f"learning rates (default {CPU.lrs})")
    p.add_argument("--seeds", nargs="+", type=int, help=f"train.seed values (default {CPU.seeds})")
    p.add_argument("--steps", type=int, help="train.steps per run (default 300; --quick 12)")
    p.add_argument("--resolution", type=int, help="data.resolution (default 16; --quick 16)")
    p.add_argument("--experiment", default="lipflow-stability", help="MLflow experiment name")
    p.add_argument("--quick", action="store_true", help="a tiny setting that runs in seconds")
    add_runner_arguments(p)


def resolve_setting(args: argparse.Namespace) -> Setting:
    base = QUICK if args.quick else FULL if args.config else CPU
    return Setting(
        config=args.config or base.config,
        steps=args.steps or base.steps,
        resolution=args.resolution or base.resolution,
        lrs=tuple(args.lrs or base.lrs),
        seeds=tuple(args.seeds if args.seeds is not None else base.seeds),
        overrides=base.overrides,
    )


def plan(
    setting: Setting, arms: list[str], out: Path, experiment: str, extra: list[str]
) -> list[RunSpec]:
    """One run per learning rate x seed x arm; arms alternate, so a partial study stays paired."""
    common = [
        f"data.cache={(out / 'data').resolve()}",
        f"tracking.experiment={experiment}",
        *([f"data.resolution={setting.resolution}"] if setting.resolution else []),
        *([f"train.steps={setting.steps}"] if setting.steps else []),
        *setting.overrides,
    ]
    specs = []
    for lr in setting.lrs:
        for seed in setting.seeds:
            for arm in arms:
                specs.append(
                    RunSpec(
                        name=f"{arm}-lr{lr:g}-seed{seed}",
                        overrides=[
                            *common,
                            *ARMS[arm][1],
                            f"train.lr={lr!r}",
                            f"train.seed={seed}",
                            *extra,
                        ],
                        meta={"arm": arm, "lr": lr, "seed": seed},
                    )
                )
    return specs


def run(args: argparse.Namespace) -> int:
    setting = resolve_setting(args)
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
    results, fresh = [], 0
    for i, spec in enumerate(specs, 1):
        if args.report_only:
            result, earlier = runner.find(spec), True
        else:
            result, earlier = runner.train(spec)
        results.append(result)
        fresh += not earlier
        print(
            f"[{i}/{len(specs)}] {run_line(result)}" + (" (earlier)" if earlier else ""), flush=True
        )
    wall = time.perf_counter() - start
    write_report(runner.out, setting, args, results, wall, fresh)
    return 0


def run_line(r: dict) -> str:
    val = r.get("final_val_bpd")
    val_text = f"val bpd {val:.4f}" if is_number(val) else "no val bpd"
    wall = f" in {r['wall_s']:.0f} s" if is_number(r.get("wall_s")) else ""
    return (
        f"{r['name']}: {r['status']} at step {r.get('steps')}{wall}, {val_text}, "
        f"events {sum(r.get('event_counts', {}).values())}, rollbacks {r.get('rollbacks', 0)}, "
        f"skipped {r.get('skipped_steps', 0)}"
    )


# ---- aggregation ---------------------------------------------------------------------------------


def aggregate(results: list[dict]) -> list[dict]:
    """One row per (arm, lr), in first-seen order, over the runs that ended (see TABULATED).

    Events, rollbacks and skipped steps are totals over the runs; the final val bpd is the mean and
    sample standard deviation over the runs that finished with a finite value (a diverged run has
    none, and averaging only the survivors is said by ``val bpd n``).
    """
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        if r.get("status") in TABULATED:
            groups.setdefault((r["study"]["arm"], float(r["study"]["lr"])), []).append(r)
    rows = []
    for (arm, lr), runs in groups.items():
        status = [r["status"] for r in runs]
        events = [sum(r.get("event_counts", {}).values()) for r in runs]
        vals = [
            r["final_val_bpd"]
            for r in runs
            if r["status"] == "finished" and is_number(r.get("final_val_bpd"))
        ]
        rows.append(
            {
                "arm": arm,
                "lr": lr,
                "runs": len(runs),
                "finished": status.count("finished"),
                "diverged": status.count("diverged"),
                "crashed": status.count("crashed") + status.count("failed"),
                "runs with events": sum(e > 0 for e in events),
                "events": sum(events),
                "rollbacks": sum(int(r.get("rollbacks", 0)) for r in runs),
                "skipped steps": sum(int(r.get("skipped_steps", 0)) for r in runs),
                "mean steps": statistics.fmean(int(r.get("steps", 0)) for r in runs),
                "val bpd mean": statistics.fmean(vals) if vals else None,
                "val bpd std": statistics.stdev(vals) if len(vals) > 1 else None,
                "val bpd n": len(vals),
            }
        )
    return rows


def run_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        counts = r.get("event_counts", {})
        rows.append(
            {
                "run": r["name"],
                "arm": r["study"]["arm"],
                "lr": f"{r['study']['lr']:g}",
                "seed": r["study"]["seed"],
                "status": r["status"],
                "steps": r.get("steps"),
                "events": ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "0",
                "rollbacks": r.get("rollbacks", 0),
                "skipped steps": r.get("skipped_steps", 0),
                "final val bpd": r.get("final_val_bpd"),
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
    per_run = run_rows(results)
    write_csv(out / "stability.csv", TABLE_COLUMNS, rows)
    write_csv(out / "runs.csv", RUN_COLUMNS, per_run)
    plot = plot_stability(rows, results, out / "stability.png")
    curves = plot_curves(results, out / "curves.png")
    compare = run_compare(out, args.experiment, results)
    pending = [r["name"] for r in results if r.get("status") not in TABULATED]
    run_walls = [r["wall_s"] for r in results if is_number(r.get("wall_s"))]
    lines = [
        "# Stability study: unconstrained Glow vs the Lipschitz-bounded flow",
        "",
        f"- config: `{setting.config}`"
        + (f", resolution {setting.resolution}" if setting.resolution else "")
        + (f", {setting.steps} steps" if setting.steps else ""),
        f"- study overrides: `{' '.join(setting.overrides + tuple(args.overrides)) or '-'}`",
        f"- learning rates {', '.join(f'{lr:g}' for lr in setting.lrs)}; seeds "
        f"{', '.join(map(str, setting.seeds))}; MLflow experiment `{args.experiment}`",
        *(f"- {arm}: {ARMS[arm][0]}, `{' '.join(ARMS[arm][1])}`" for arm in args.arms),
        f"- wall time: {wall:.0f} s for this invocation, which trained {fresh} of the "
        f"{len(results)} runs; {sum(run_walls):.0f} s summed over the runs' own wall times",
        *([f"- not finished yet: {', '.join(pending)}"] if pending else []),
        "",
        "## Per arm and learning rate",
        "",
        "Totals over seeds; val bpd: mean ± sample std over the runs that finished (n of them).",
        "",
        to_markdown(*display_table(rows)),
        "## Runs",
        "",
        to_markdown(
            RUN_COLUMNS, [{k: "-" if v is None else v for k, v in r.items()} for r in per_run]
        ),
        "## Plots",
        "",
        *(["![stability](stability.png)", ""] if plot else []),
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
    print(f"wrote {out / 'stability.md'}, {out / 'stability.csv'}, {out / 'runs.csv'}")


def display_table(rows: list[dict]) -> tuple[list[str], list[dict]]:
    columns = [c for c in TABLE_COLUMNS if not c.startswith("val bpd")] + ["val bpd (finished)"]
    shown = []
    for row in rows:
        mean, std, n = row["val bpd mean"], row["val bpd std"], row["val bpd n"]
        text = "-" if mean is None else f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")
        shown.append(
            {
                **row,
                "lr": f"{row['lr']:g}",
                "mean steps": f"{row['mean steps']:.0f}",
                "val bpd (finished)": f"{text} (n={n})",
            }
        )
    return columns, shown


def plot_stability(rows: list[dict], results: list[dict], path: Path) -> bool:
    """Events per run and final val bpd against the learning rate, one colour per arm."""
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    colors = {arm: matplotlib.colormaps["tab10"](i) for i, arm in enumerate(arms)}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for k, arm in enumerate(arms):
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["lr"])
        shift = 1.0 + 0.06 * (k - (len(arms) - 1) / 2)  # side by side on the log axis
        lrs = [r["lr"] * shift for r in mine]
        top.plot(
            lrs,
            [r["events"] / r["runs"] for r in mine],
            "o-",
            color=colors[arm],
            label=f"{arm}: events per run",
        )
        top.plot(
            lrs,
            [r["rollbacks"] / r["runs"] for r in mine],
            "s--",
            color=colors[arm],
            label=f"{arm}: rollbacks per run",
        )
        for r, x in zip(mine, lrs):
            if r["diverged"] or r["crashed"]:
                top.annotate(
                    f"{r['diverged'] + r['crashed']}/{r['runs']} stopped",
                    (x, r["events"] / r["runs"]),
                    textcoords="offset points",
                    xytext=(4, 6 + 10 * k),
                    fontsize=7,
                    color=colors[arm],
                )
        seeds = [
            (float(r["study"]["lr"]) * shift, r["final_val_bpd"])
            for r in results
            if r["study"]["arm"] == arm
            and r.get("status") == "finished"
            and is_number(r.get("final_val_bpd"))
        ]
        if seeds:
            bottom.plot(*zip(*seeds), ".", color=colors[arm], alpha=0.5)
        means = [(x, r) for x, r in zip(lrs, mine) if r["val bpd mean"] is not None]
        if means:
            bottom.errorbar(
                [x for x, _ in means],
                [r["val bpd mean"] for _, r in means],
                yerr=[r["val bpd std"] or 0.0 for _, r in means],
                fmt="o-",
                color=colors[arm],
                capsize=3,
                label=f"{arm}: mean ± std (finished runs)",
            )
    top.set_ylabel("per run")
    top.set_title("divergence guard: events and rollbacks (totals over seeds / runs)")
    top.legend(fontsize=7)
    bottom.set_ylabel("final val bpd")
    bottom.set_xlabel("learning rate")
    bottom.set_xscale("log")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_curves(results: list[dict], path: Path) -> bool:
    """Train bpd against step, one panel per learning rate, one colour per arm, one line per seed;
    an x where the guard stopped a run (its curve's last logged point)."""
    curves = {}
    for r in results:
        rows = read_jsonl(Path(r.get("run_dir", "")) / "metrics.jsonl")
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

    lrs = sorted({float(r["study"]["lr"]) for r, _ in curves.values()})
    arms = list(dict.fromkeys(r["study"]["arm"] for r, _ in curves.values()))
    colors = {arm: matplotlib.colormaps["tab10"](i) for i, arm in enumerate(arms)}
    cols = min(2, len(lrs))
    rows_n = -(-len(lrs) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.2 * rows_n), squeeze=False)
    finals = [p[-1][1] for r, p in curves.values() if r["status"] == "finished"]
    starts = [p[0][1] for _, p in curves.values()]
    low = min(finals or starts) - 0.1
    high = max(starts) + 0.2  # a diverging curve leaves the frame; its x marks where it stopped
    for ax, lr in zip(axes.flat, lrs):
        for r, points in curves.values():
            if float(r["study"]["lr"]) != lr:
                continue
            c = colors[r["study"]["arm"]]
            ax.plot(*zip(*points), color=c, lw=1, alpha=0.8)
            if r["status"] != "finished":
                step = points[-1][0]
                ax.plot(step, min(points[-1][1], high), "x", color=c, ms=9, mew=2)
        ax.set_title(f"lr {lr:g}", fontsize=9)
        ax.set_ylim(low, high)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("train bpd", fontsize=8)
    for ax in list(axes.flat)[len(lrs) :]:
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
