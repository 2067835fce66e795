"""`python -m pipeline model --config X [a.b=value ...]`: build the model and print its summary."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import add_config_arguments, config_from_args
from pipeline.flows.multiscale import build_flow
from pipeline.flows.summary import summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    resolution = cfg.data.resolution
    try:
        flow = build_flow(cfg.model, (3, resolution, resolution), cfg.data.n_bits)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(flow))
    return 0
