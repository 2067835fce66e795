"""What the studies write: CSV tables, the compare report of their MLflow experiment."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

from pipeline.study.runner import pipeline


def is_number(v) -> bool:
    """A finite int or float (not a bool, not None, not NaN)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


def run_compare(out: Path, experiment: str, results: list[dict]) -> list[Path]:
    """`python -m pipeline compare` on the study's experiment into <out>/compare; the plots it
    wrote (none if it could not run: the study's own tables do not depend on it)."""
    uri = next((r["tracking_uri"] for r in results if r.get("tracking_uri")), None)
    store = ["--tracking-uri", uri] if uri else ["--run-root", str(out / "runs")]
    target = out / "compare"
    try:
        pipeline(
            ["compare", "--experiment", experiment, *store, "--out", str(target)],
            out / "logs" / "compare.log",
        )
    except RuntimeError as e:
        print(f"warning: compare did not run: {e}", file=sys.stderr)
        return []
    return sorted(target.glob("*.png"))
