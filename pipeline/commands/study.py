"""`python -m pipeline study <stability|optimum|cost>`: reproduce the paper's claims.

    python -m pipeline study stability --out runs/study-stability        # ~1 h on 2 CPU cores
    python -m pipeline study optimum --out runs/study-optimum             # ~5 min
    python -m pipeline study cost --config configs/celebahq-256.yaml      # FLOPs -> GPU-hours
    python -m pipeline study stability --quick --out /tmp/s               # seconds (tests)

Each study has its own options (``python -m pipeline study stability --help``); section.key=value
overrides for every run go after the options. docs/studies.md has the results and the full-scale
commands.
"""

from __future__ import annotations

import argparse

from pipeline.commands import Table, add_subcommands, subcommand

STUDIES: Table = {
    "stability": (
        "pipeline.study.stability",
        "Glow, the certified default and the old bounded preset: divergence rates across the "
        "learning-rate transition with and without clipping, bf16, the exploding-inverse battery",
    ),
    "optimum": (
        "pipeline.study.optimum",
        "linear flows on Gaussian images and faces against the closed-form optimum",
    ),
    "cost": (
        "pipeline.study.cost",
        "training FLOPs per image of a config's model, and the GPU-hours they imply (estimate)",
    ),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_subcommands(p, "study", STUDIES)


def run(args: argparse.Namespace) -> int:
    return int(subcommand(args, "study", STUDIES).run(args) or 0)
