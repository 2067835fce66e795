"""`python -m pipeline config --config X [a.b=value ...]`: print the resolved tree as YAML."""

from __future__ import annotations

import argparse
import sys

import yaml

from pipeline.config import ConfigError, load_config, to_dict


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0
