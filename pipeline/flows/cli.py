"""`python -m pipeline model --config X [a.b=value ...]`: build the model and print its summary."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config
from pipeline.flows.multiscale import build_flow
from pipeline.flows.summary import summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.levels=3")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    resolution = cfg.data.resolution
    try:
        flow = build_flow(cfg.model, (3, resolution, resolution), cfg.data.n_bits)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(flow))
    return 0
