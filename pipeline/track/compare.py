"""Compare MLflow runs: a table and plots (the `compare` command, pipeline/commands/compare.py).

One row per run: name, short id, status, the train dataset (name and digest: runs on other data
stand out), the params that differ between the runs (equal ones are left out), steps, final
train/bpd, best val/bpd, the optimum reference and the last gap to it, the divergence events by
kind, guard rollbacks and skipped steps, and mean images/s; printed as Markdown and written to
compare.md and compare.csv. Plots (PNG): bpd.png (train and val, the optimum dotted), balance.png
(log-det per level over time), grad_norms.png (global and per level), lipschitz.png (estimates
against certified bounds); events are marked on every curve. A plot no selected run has metrics for
is skipped (and said so); a run without diagnostics still gets its bpd curves.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.track.store import open_client

LEVEL = re.compile(r"balance/level(\d+)/logdet$")
GRAD_LEVEL = re.compile(r"optim/grad_norm/level(\d+)$")
MARKERS = "vX^sDP*ho<>"


@dataclass
class ComparedRun:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # by step
    datasets: dict[str, str] = field(default_factory=dict)  # context -> "name (digest)"
    experiment_id: str = ""

    def last(self, key: str) -> float | None:
        points = self.history.get(key)
        return points[-1][1] if points else None

    def label(self) -> str:
        return f"{self.name} ({self.run_id[:8]})"


def load_runs(uri: str, run_ids: list[str], experiment: str) -> list[ComparedRun]:
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    client = open_client(uri)  # a fresh run root's store may be being created right now
    if run_ids:
        found = []
        for run_id in run_ids:
            try:
                found.append(client.get_run(run_id))
            except MlflowException as e:
                raise LookupError(f"run {run_id} is not in {uri}") from e
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = [e.name for e in client.search_experiments()]
            raise LookupError(f"no experiment {experiment!r} in {uri}; it has: {', '.join(names)}")
        found = client.search_runs(
            [exp.experiment_id],
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
        )
        if not found:
            raise LookupError(f"experiment {experiment!r} in {uri} has no runs")
    runs = []
    for r in found:
        run = ComparedRun(
            run_id=r.info.run_id,
            name=r.info.run_name or r.info.run_id[:8],
            status=r.info.status,
            params=dict(r.data.params),
            tags=dict(r.data.tags),
            datasets=dataset_labels(r),
            experiment_id=r.info.experiment_id,
        )
        for key in r.data.metrics:
            if key.startswith("system/"):  # the node monitors: not a training comparison
                continue
            points = client.get_metric_history(r.info.run_id, key)
            run.history[key] = [
                (m.step, m.value) for m in sorted(points, key=lambda m: (m.step, m.timestamp))
            ]
        runs.append(run)
    return runs


def dataset_labels(run: Any) -> dict[str, str]:
    """Context ("training", "validation") -> "name (digest)" of the run's dataset inputs
    (pipeline/track/lineage.py); several of one context (a resume on other data) joined by "+"."""
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    labels: dict[str, list[str]] = {}
    for item in run.inputs.dataset_inputs if run.inputs else []:
        context = next((t.value for t in item.tags if t.key == MLFLOW_DATASET_CONTEXT), "")
        labels.setdefault(context, []).append(f"{item.dataset.name} ({item.dataset.digest})")
    return {context: " + ".join(names) for context, names in labels.items()}


# ---- the table -------------------------------------------------------------------------------


def event_counts(run: ComparedRun) -> dict[str, int]:
    """Per kind: the sink's exact tag, else the last value of the events/<kind> count metric."""
    counts = {
        k[len("events/") :]: int(v[-1][1])
        for k, v in run.history.items()
        if k.startswith("events/")
    }
    for key, value in run.tags.items():
        if key.startswith("events.") and key not in ("events.total", "events.last"):
            try:
                counts[key[len("events.") :]] = int(value)
            except ValueError:
                continue
    return counts


def differing_params(runs: list[ComparedRun]) -> list[str]:
    keys = sorted({k for r in runs for k in r.params})
    return [k for k in keys if len({r.params.get(k) for r in runs}) > 1]


def table(runs: list[ComparedRun]) -> tuple[list[str], list[dict[str, Any]]]:
    params = differing_params(runs)
    counts = [event_counts(r) for r in runs]
    kinds = sorted({k for c in counts for k in c})
    columns = [
        "run",
        "run_id",
        "status",
        "train data",
        *params,
        "steps",
        "final train/bpd",
        "best val/bpd",
        "optimum bpd",
        "gap bpd",
        *[f"events {k}" for k in kinds],
        "rollbacks",
        "skipped steps",
        "images/s",
    ]
    rows = []
    for run, count in zip(runs, counts):
        val = [v for _, v in run.history.get("val/bpd", [])]
        speed = [v for _, v in run.history.get("speed/images_per_s", [])]
        steps = [s for k, points in run.history.items() for s, _ in points[-1:]]
        row = {
            "run": run.name,
            "run_id": run.run_id[:8],
            "status": run.status,
            "train data": run.datasets.get("training", ""),
            **{k: run.params.get(k, "") for k in params},
            "steps": max(steps, default=0),
            "final train/bpd": run.last("train/bpd"),
            "best val/bpd": min(val, default=None),
            "optimum bpd": run.last("theory/optimum_bpd"),
            "gap bpd": run.last("theory/gap_bpd"),
            **{f"events {k}": count.get(k, 0) for k in kinds},
            "rollbacks": int(run.last("guard/rollbacks") or 0),
            "skipped steps": int(run.last("guard/skipped") or 0),
            "images/s": sum(speed) / len(speed) if speed else None,
        }
        rows.append({k: ("" if v is None else v) for k, v in row.items()})
    return columns, rows


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
        *("| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


# ---- the plots -------------------------------------------------------------------------------


def event_marks(run: ComparedRun) -> list[tuple[int, str]]:
    """(step, kind) wherever a count rose: events/<kind> (logged at each event by the sink, and
    maybe at every log step by the loop) and guard/rollbacks."""
    marks = []
    for key, points in run.history.items():
        if key.startswith("events/") or key == "guard/rollbacks":
            kind = "rollback" if key == "guard/rollbacks" else key[len("events/") :]
            previous = 0.0
            for step, value in points:
                if value > previous:
                    marks.append((step, kind))
                previous = max(previous, value)
    return sorted(marks)


class Style:
    """One colour per run and one marker per event kind, the same in every plot."""

    def __init__(self, runs: list[ComparedRun]):
        import matplotlib

        cycle = matplotlib.colormaps["tab10"]
        self.color = {r.run_id: cycle(i % 10) for i, r in enumerate(runs)}
        kinds = sorted({k for r in runs for _, k in event_marks(r)})
        self.marker = {k: MARKERS[i % len(MARKERS)] for i, k in enumerate(kinds)}


def plot_all(
    runs: list[ComparedRun], out: Path, bpd_max: float | None = None
) -> tuple[list[Path], list[tuple[str, str]]]:
    import functools

    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    style = Style(runs)
    written, skipped = [], []
    for name, draw in (
        ("bpd.png", functools.partial(plot_bpd, top=bpd_max)),
        ("balance.png", plot_balance),
        ("grad_norms.png", plot_grad_norms),
        ("lipschitz.png", plot_lipschitz),
    ):
        fig = draw(runs, style)
        if fig is None:
            skipped.append((name, "no selected run has these metrics"))
            continue
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(out / name)
    return written, skipped


def xy(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [s for s, _ in points], [v for _, v in points]


def mark_events(ax, runs: list[ComparedRun], style: Style, on: str | None = None) -> None:
    """A faint vertical line at each event, and its marker on the curve ``on`` when given."""
    for run in runs:
        points = dict(run.history.get(on, [])) if on else {}
        for step, kind in event_marks(run):
            ax.axvline(step, color=style.color[run.run_id], alpha=0.35, linestyle=":", lw=1)
            if points:
                nearest = min(points, key=lambda s: abs(s - step))
                ax.plot(
                    step,
                    points[nearest],
                    style.marker[kind],
                    color=style.color[run.run_id],
                    markersize=9,
                    markeredgecolor="black",
                    zorder=5,
                )


def legend(
    ax, runs: list[ComparedRun], style: Style, prefix: str, extra: list | None = None
) -> None:
    """Runs that have a metric starting with ``prefix``, event kinds, and ``extra`` entries."""
    from matplotlib.lines import Line2D

    shown = [r for r in runs if any(k.startswith(prefix) for k in r.history)]
    handles = [Line2D([], [], color=style.color[r.run_id], label=r.label()) for r in shown]
    handles += [
        Line2D([], [], marker=m, linestyle="", color="grey", markeredgecolor="black", label=k)
        for k, m in style.marker.items()
    ]
    handles += extra or []
    if len(handles) > 8:  # many runs: beside the plot, not over the curves
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(handles=handles, fontsize=7, loc="best")


def new_figure(panels: int, title: str):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(panels, 1, figsize=(9, 3.2 * panels), sharex=True, squeeze=False)
    fig.suptitle(title)
    axes = axes[:, 0]
    axes[-1].set_xlabel("step")
    return fig, axes


def bpd_range(runs: list[ComparedRun], top: float | None = None) -> tuple[float, float] | None:
    """The bpd plot's y-range: from the lowest value (or optimum) up to ``top``.

    By default ``top`` is the highest first logged bpd of any curve plus half the distance from
    there down to the lowest value, capped at the highest value: a healthy run goes down from its
    first log (a validation curve may creep back up a little), so every healthy curve is whole, and
    a divergence spike to 1e3 does not flatten them into a line.
    """
    curves = [run.history.get(k, []) for run in runs for k in ("train/bpd", "val/bpd")]
    finite = [v for points in curves for _, v in points if math.isfinite(v)]
    if not finite:
        return None
    optima = [run.last("theory/optimum_bpd") for run in runs]
    low = min(finite + [v for v in optima if v is not None and math.isfinite(v)])
    if top is None:
        first = max(points[0][1] for points in curves if points and math.isfinite(points[0][1]))
        top = min(first + 0.5 * (first - low), max(finite))
    top = max(top, low + 1e-3)
    pad = 0.04 * (top - low)
    return low - pad, top + pad


def plot_bpd(runs: list[ComparedRun], style: Style, top: float | None = None):
    from matplotlib.lines import Line2D

    fig, (ax,) = new_figure(1, "bits per dimension (solid train, dashed val, dotted optimum)")
    span = bpd_range(runs, top)
    clipped = 0
    for run in runs:
        c = style.color[run.run_id]
        for key, line in (
            ("train/bpd", {"lw": 1.2}),
            ("val/bpd", {"ls": "--", "marker": "o", "ms": 3}),
        ):
            steps, values = xy(run.history.get(key, []))
            ax.plot(steps, values, color=c, **line)
            above = [
                (s, v) for s, v in zip(steps, values) if span and (v > span[1] or math.isnan(v))
            ]
            if above:  # off the chart: a triangle on the top edge
                clipped += len(above)
                ax.plot(
                    [s for s, _ in above], [span[1]] * len(above), "^", color=c, ms=6, clip_on=False
                )
        optimum = run.last("theory/optimum_bpd")
        if optimum is not None and math.isfinite(optimum):
            ax.axhline(optimum, color=c, linestyle=":", lw=1)
    mark_events(ax, runs, style, on="train/bpd")
    if span:
        ax.set_ylim(*span)
    ax.set_ylabel("bpd")
    extra = [
        Line2D([], [], color="black", label="train"),
        Line2D([], [], color="black", linestyle="--", marker="o", ms=3, label="val"),
    ]
    if clipped:
        extra.append(
            Line2D([], [], marker="^", ls="", color="black", label=f"{clipped} above {span[1]:.2f}")
        )
    legend(ax, runs, style, "train/bpd", extra)
    return fig


def plot_balance(runs: list[ComparedRun], style: Style):
    levels = sorted({int(m[1]) for r in runs for k in r.history if (m := LEVEL.match(k))})
    totals = [
        k for k in ("balance/expansion", "balance/contraction") if any(k in r.history for r in runs)
    ]
    if not levels and not totals:
        return None
    fig, axes = new_figure(len(levels) + bool(totals), "log-det balance")
    for ax, level in zip(axes, levels):
        for run in runs:
            ax.plot(
                *xy(run.history.get(f"balance/level{level}/logdet", [])),
                color=style.color[run.run_id],
            )
        ax.set_ylabel(f"level {level} log|det|")
        mark_events(ax, runs, style)
    if totals:
        ax = axes[-1]
        for run in runs:
            for key, ls in zip(totals, ("-", "--")):
                ax.plot(*xy(run.history.get(key, [])), color=style.color[run.run_id], linestyle=ls)
        ax.set_ylabel(" / ".join(k.split("/")[1] for k in totals) + "\n(solid / dashed)")
        mark_events(ax, runs, style)
    legend(axes[0], runs, style, "balance/")
    return fig


def plot_grad_norms(runs: list[ComparedRun], style: Style):
    levels = sorted({int(m[1]) for r in runs for k in r.history if (m := GRAD_LEVEL.match(k))})
    has_global = any("optim/grad_norm" in r.history for r in runs)
    if not levels and not has_global:
        return None
    fig, axes = new_figure(has_global + bool(levels), "gradient norms")
    if has_global:
        for run in runs:
            axes[0].plot(*xy(run.history.get("optim/grad_norm", [])), color=style.color[run.run_id])
        axes[0].set_ylabel("global")
    if levels:
        styles = ["-", "--", ":", "-."]
        for run in runs:
            for i, level in enumerate(levels):
                axes[-1].plot(
                    *xy(run.history.get(f"optim/grad_norm/level{level}", [])),
                    color=style.color[run.run_id],
                    linestyle=styles[i % len(styles)],
                )
        axes[-1].set_ylabel(
            "per level\n(" + ", ".join(f"{styles[i % 4]} {lv}" for i, lv in enumerate(levels)) + ")"
        )
    for ax in axes:
        ax.set_yscale("log")
        mark_events(ax, runs, style)
    legend(axes[0], runs, style, "optim/grad_norm")
    return fig


def plot_lipschitz(runs: list[ComparedRun], style: Style):
    sides = [
        side
        for side in ("forward", "inverse")
        if any(f"lipschitz/{side}_{what}" in r.history for r in runs for what in ("est", "bound"))
    ]
    if not sides:
        return None
    fig, axes = new_figure(
        len(sides), "Lipschitz constants: estimate (solid) against certified bound (dashed)"
    )
    for ax, side in zip(axes, sides):
        for run in runs:
            c = style.color[run.run_id]
            ax.plot(*xy(run.history.get(f"lipschitz/{side}_est", [])), color=c)
            ax.plot(*xy(run.history.get(f"lipschitz/{side}_bound", [])), color=c, linestyle="--")
        ax.set_yscale("log")
        ax.set_ylabel(f"{side} Lip")
        mark_events(ax, runs, style)
    legend(axes[0], runs, style, "lipschitz/")
    return fig
