"""`python -m pipeline bench <name> [args]`: run bench/<name>.py, which prints JSON.

Benchmarks live in bench/ at the repository root (they are measurements, not library code); this command
is a stable way to reach them from an editable install.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def available() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="benchmark name: one of bench/*.py")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")


def run(args: argparse.Namespace) -> int:
    path = BENCH_DIR / f"{args.name}.py"
    if not path.is_file():
        names = ", ".join(available()) or "none found"
        print(
            f"error: no benchmark {args.name!r} in {BENCH_DIR}; available: {names}", file=sys.stderr
        )
        return 2
    sys.argv = [str(path), *args.args]
    runpy.run_path(str(path), run_name="__main__")
    return 0
