"""The stability study's outputs: stability.md, the CSV tables, the plots and the compare report,
and the tables it prints."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from pipeline.study.report import is_number, run_compare, write_csv
from pipeline.study.stability.battery import PROBED
from pipeline.study.stability.grid import ARMS, Sweep
from pipeline.study.stability.plots import plot_battery, plot_curves, plot_stability
from pipeline.study.stability.stats import (
    BATTERY_COLUMNS,
    RUN_COLUMNS,
    TABLE_COLUMNS,
    TABULATED,
    aggregate,
    aggregate_battery,
    run_rows,
)
from pipeline.track.compare import to_markdown


def write_report(
    out: Path,
    sweep: Sweep,
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
        f"- config: `{sweep.config}`"
        + (f", resolution {sweep.resolution}" if sweep.resolution else "")
        + (f", {sweep.steps} steps" if sweep.steps else ""),
        f"- study overrides: `{' '.join(sweep.overrides + tuple(args.overrides)) or '-'}`",
        f"- cells: {', '.join(c.tag for c in sweep.cells)}; seeds "
        f"{', '.join(map(str, sweep.seeds))}; MLflow experiment `{args.experiment}`",
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
