"""`python -m pipeline config --config X [a.b=value ...]`: print the resolved tree as YAML."""

from __future__ import annotations

import argparse

import yaml

from pipeline.config import add_config_arguments, config_from_args, to_dict


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0
