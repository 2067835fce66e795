"""`python -m pipeline synth --out DIR [--n 64] [--resolution 64] [--seed 0]`: a folder of faces.

Image i is ``<out>/<i:06d>.png``, a function of (seed, i) alone (pipeline.data.synth.make_face).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.data.images import encode_png
from pipeline.data.synth import make_face
from pipeline.io import atomic_write_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write <index>.png files into")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--resolution", type=int, default=64, help="side length in pixels")
    p.add_argument("--seed", type=int, default=0, help="image i is a function of (seed, i) only")


def run(args: argparse.Namespace) -> int:
    if args.n < 1 or args.resolution < 8:
        print("error: need --n >= 1 and --resolution >= 8", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        atomic_write_bytes(
            out / f"{i:06d}.png", encode_png(make_face(args.resolution, args.seed, i))
        )
    print(f"wrote {args.n} faces of {args.resolution}² to {out}")
    return 0
