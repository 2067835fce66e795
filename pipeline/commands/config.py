"""`python -m pipeline config --config X [a.b=value ...]`: print the resolved tree as YAML, under
a comment listing the keys each ``model.preset`` stands for."""

from __future__ import annotations

import argparse

import yaml

from pipeline.config import (
    PRESET_KEY,
    add_config_arguments,
    config_from_args,
    preset_overrides,
    to_dict,
)
from pipeline.flows.config import PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    print(f"# {PRESET_KEY}=NAME stands for (keys given beside it win):")
    for name in PRESETS:
        print(f"#   {name}: {' '.join(preset_overrides(name)) or '(the defaults)'}")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0
