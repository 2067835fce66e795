"""`python -m pipeline compare`: a table and plots comparing MLflow runs (pipeline/track/compare.py).

    python -m pipeline compare --out cmp                          # experiment "lipflow" in runs/mlflow.db
    python -m pipeline compare --experiment celebahq-256 --out cmp
    python -m pipeline compare RUN_ID RUN_ID --tracking-uri http://host:5000 --out cmp

The store is ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the training default: the SQLite
file ``<--run-root>/mlflow.db`` (``--run-root`` defaults to runs). It ends with the command that
serves the store in a browser and the link to the experiment's runs there (pipeline/track/ui.py).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from pipeline.track.compare import load_runs, plot_all, table, to_markdown
from pipeline.track.config import TrackingConfig
from pipeline.track.ui import ui_command, ui_link


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to compare (full MLflow ids)")
    p.add_argument(
        "--experiment",
        help=f"every active run of this experiment (default when no RUN_ID: "
        f"{TrackingConfig.experiment!r})",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, then sqlite:///<run root>/mlflow.db)",
    )
    p.add_argument("--run-root", default="runs", help="where training put mlflow.db (default runs)")
    p.add_argument("--out", required=True, help="folder for compare.csv, compare.md and the plots")
    p.add_argument(
        "--bpd-max",
        type=float,
        help="top of the bpd plot's y-axis (default: the highest first logged bpd plus half the "
        "way down to the lowest, so divergence spikes do not flatten the curves; points above "
        "are drawn as triangles on the edge)",
    )


def run(args: argparse.Namespace) -> int:
    uri = resolve_uri(args)
    if uri is None:
        print(
            f"error: no MLflow store: give --tracking-uri, set MLFLOW_TRACKING_URI, or point "
            f"--run-root at a folder with mlflow.db (looked for {Path(args.run_root) / 'mlflow.db'})",
            file=sys.stderr,
        )
        return 2
    if args.run_ids and args.experiment:
        print("error: give RUN_IDs or --experiment, not both", file=sys.stderr)
        return 2
    try:
        runs = load_runs(uri, args.run_ids, args.experiment or TrackingConfig.experiment)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = table(runs)
    markdown = to_markdown(columns, rows)
    (out / "compare.md").write_text(markdown)
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(runs)} runs from {uri}\n")
    print(markdown)
    written, skipped = plot_all(runs, out, bpd_max=args.bpd_max)
    print(f"wrote {out / 'compare.csv'}, {out / 'compare.md'}" + "".join(f", {p}" for p in written))
    for name, why in skipped:
        print(f"skipped {name}: {why}")
    if command := ui_command(uri):
        print(f"open the MLflow UI: {command}")
    for experiment_id in dict.fromkeys(r.experiment_id for r in runs):
        print(f"the runs in the MLflow UI: {ui_link(uri, experiment_id)}")
    return 0


def resolve_uri(args: argparse.Namespace) -> str | None:
    if args.tracking_uri:
        return args.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path(args.run_root) / "mlflow.db"
    return f"sqlite:///{db.resolve()}" if db.is_file() else None
