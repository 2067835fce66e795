"""The stability study's three plots: divergence rate and bpd against the learning rate, the
battery per arm, and the training curves per cell (matplotlib, imported when a plot is drawn)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from pipeline.study.report import is_number
from pipeline.study.runner import read_jsonl
from pipeline.study.stability.battery import FINISHED, OOD, PROBED, as_float
from pipeline.study.stability.grid import ARMS
from pipeline.study.stability.stats import cell_of


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
