"""The stability study's numbers: divergence rates with their Wilson intervals, steps to the
first event, one row per arm and cell, per arm and kind of checkpoint, and per run."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from pipeline.study.report import is_number
from pipeline.study.runner import read_jsonl
from pipeline.study.stability.battery import (
    BATTERY_HEADLINE,
    FINISHED,
    OOD,
    PROBED,
    SAMPLE_T,
    battery_headline,
)
from pipeline.study.stability.grid import ARMS

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
TABULATED = (*FINISHED, "diverged", "failed", "crashed")
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
