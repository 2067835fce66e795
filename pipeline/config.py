"""One typed config tree for every command.

Precedence, lowest first: the dataclass defaults below < a YAML file (``--config X.yaml``) < command-line
overrides ``a.b=value`` (values parsed as YAML scalars, so ``train.lr=3e-4`` is a float and
``data.hflip=false`` a bool). Each part of the package owns its section (``pipeline/<part>/config.py``);
this module only assembles the tree, loads, validates and saves it.

``model.preset=NAME`` stands for the keys of a named preset (``PRESETS`` in pipeline/flows/config.py),
laid down before the other keys of its source: in a YAML file beneath that file's own keys, on the
command line beneath the other overrides whatever their order. So keys given beside a preset win
over its keys, and a preset on the command line wins over the file's keys; the resolved tree holds
the keys, not the name.

Unknown keys fail with the closest valid keys; a value of the wrong type fails naming the key, the value
and the expected type; a value outside its range (each section's ``RANGES``, e.g. train.steps ≥ 1) or a
combination that cannot work (``check_combinations``: levels against resolution, batch arithmetic)
fails naming the key, the value and what is allowed, before any work starts. The resolved tree is
written to every run folder and checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.data.config import DataConfig
from pipeline.errors import PipelineError
from pipeline.flows.config import PRESETS, ModelConfig
from pipeline.io import atomic_write_text
from pipeline.theory.config import GuardConfig
from pipeline.track.config import TrackingConfig
from pipeline.train.config import DEEPSPEED_OWNED, FaultConfig, TrainConfig, deepspeed_owned


class ConfigError(PipelineError, ValueError):
    """A config file or override that does not fit the tree; the message says what to change."""

    exit_code = 2


@dataclass
class RunConfig:
    name: str = "debug"
    root: str = "runs"  # the run folder is <root>/<name>

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)


def load_config(
    path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    ignore: typing.Collection[str] = (),
) -> Config:
    """defaults < YAML file at ``path`` < ``a.b=value`` overrides; each one's model.preset
    beneath its other keys (``expand_preset``). The file's keys named in ``ignore``
    (``section.key``) are skipped."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist; the shipped ones are in configs/"
            )
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections, got {type(tree).__name__}"
            )
        for dotted in ignore:
            section, _, key = dotted.partition(".")
            if isinstance(tree.get(section), dict):
                tree[section].pop(key, None)
        cfg = merge(cfg, expand_preset(tree, str(path)), where=str(path))
    # the command line's preset before its other overrides (a stable sort keeps their order)
    for item in sorted(overrides, key=lambda item: item.partition("=")[0].strip() != PRESET_KEY):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4"
            )
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        tree: dict[str, Any] = {}
        node = tree
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        where = f"override {item!r}"
        cfg = merge(cfg, expand_preset(tree, where), where=where)
    check_values(cfg)
    return cfg


PRESET_KEY = "model.preset"


def expand_preset(tree: dict, where: str) -> dict:
    """``tree`` with its model.preset replaced by the preset's keys, beneath the model keys
    given beside it."""
    model = tree.get("model")
    if not isinstance(model, dict) or "preset" not in model:
        return tree
    given = dict(model)
    name = given.pop("preset")
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"{where}: {PRESET_KEY} = {name!r}: must be one of {', '.join(PRESETS)}")
    return {**tree, "model": {**PRESETS[name], **given}}


def preset_overrides(name: str) -> tuple[str, ...]:
    """The keys of preset ``name`` as overrides, e.g. ``model.spectral_norm=false``."""
    return tuple(
        f"model.{key}={str(value).lower() if isinstance(value, bool) else value}"
        for key, value in PRESETS[name].items()
    )


def check_values(cfg: Config) -> None:
    """Every numeric key within its section's RANGES, then the cross-key rules: one ConfigError
    naming the key, the value and what is allowed (the first offence)."""
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        for key, allowed in getattr(type(part), "RANGES", {}).items():
            value = getattr(part, key)
            if not allowed.allows(value):
                raise ConfigError(f"{section.name}.{key} = {value!r}: must be {allowed}")
    check_combinations(cfg)


def check_combinations(cfg: Config) -> None:
    """Rules across keys that need no file system: the image must survive model.levels squeezes;
    under a launcher (WORLD_SIZE set), train.global_batch = micro_batch × grad_accum × ranks."""
    r, levels = cfg.data.resolution, cfg.model.levels
    if r % 2**levels:
        fits = (r & -r).bit_length() - 1  # how many times 2 divides r
        fewer = f"model.levels ≤ {fits} or " if fits else ""
        raise ConfigError(
            f"data.resolution = {r} with model.levels = {levels}: each level halves the image, so "
            f"the resolution must be a multiple of 2^{levels} = {2**levels}; use {fewer}a "
            f"resolution such as {max(r - r % 2**levels, 2**levels)}"
        )
    owned = deepspeed_owned(cfg.train.deepspeed)
    if owned:
        raise ConfigError(
            f"train.deepspeed.{owned[0]} is set by the pipeline from its own keys; use "
            f"{DEEPSPEED_OWNED[owned[0]]} instead"
        )
    if "WORLD_SIZE" in os.environ:
        check_batch(cfg.train, int(os.environ["WORLD_SIZE"]))


def check_batch(train: Any, world: int) -> None:
    """train.global_batch (when set) must be micro_batch × grad_accum × ``world`` ranks."""
    derived = train.micro_batch * train.grad_accum * world
    if train.global_batch and train.global_batch != derived:
        raise ConfigError(
            f"train.global_batch = {train.global_batch} but train.micro_batch "
            f"{train.micro_batch} × train.grad_accum {train.grad_accum} × {world} rank(s) = "
            f"{derived}; change one of them, or set train.global_batch=0 to derive it"
        )


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config X.yaml`` and positional ``section.key=value`` overrides, for every command."""
    parser.add_argument("--config", help="YAML file, e.g. configs/debug.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4")


def config_from_args(args: argparse.Namespace) -> Config:
    """The resolved config of a command line; a ConfigError becomes the entry point's one-line
    ``error: ...`` with exit status 2."""
    return load_config(args.config, args.overrides)


# Keys that moved to another section: a config written for the old layout gets told where to.
MOVED = {
    f"train.{key}": f"guard.{key}"
    for key in ("rollback_events", "rollback_window", "rollback_lr_factor", "max_rollbacks")
}


# Keys added since checkpoints were first saved -> the value a saved config without them was
# trained with: a checkpoint's config is read with them filled in (load_saved_config), and a resume
# compares against that (train/compat.py), so an old run loads and resumes as it was trained.
ADDED = {"model.prior_log_std_bound": 0.0, "train.share_certificate": False}
# Keys removed since checkpoints were first saved -> why their saved value changes nothing: a
# checkpoint's config is read (and a resume compared) without them; a config that sets one fails
# as any unknown key does.
REMOVED = {"model.power_iterations": "read only by spectral_method=power, which is gone"}


def load_saved_config(path: str | Path) -> Config:
    """The config a run or checkpoint folder saved (save_config writes every key), with each
    ADDED key it lacks at the value it was trained with and the REMOVED keys left out."""
    tree = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else {}
    saved = flatten(tree) if isinstance(tree, dict) else {}
    return load_config(
        path, [f"{k}={v!r}" for k, v in ADDED.items() if k not in saved], ignore=REMOVED
    )


def merge(obj: Any, tree: dict, where: str, prefix: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with the values of the nested mapping ``tree`` applied."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in names and dotted in MOVED:
            raise ConfigError(f"{where}: {dotted!r} is now {MOVED[dotted]!r}; rename it")
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(dotted, valid, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(
                f"{where}: unknown config key {dotted!r}{hint} Valid keys here: {', '.join(valid)}"
            )
        current = getattr(obj, key)
        if isinstance(current, dict):  # a free-form mapping (train.deepspeed): merged, not replaced
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {dotted!r} is a mapping; give it one, not {value!r}")
            changes[key] = deep_merge(current, value)
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where}: {dotted!r} is a section; give it a mapping, not {value!r}"
                )
            changes[key] = merge(current, value, where, prefix=f"{dotted}.")
        else:
            changes[key] = coerce(value, hints[key], dotted, where)
    return dataclasses.replace(obj, **changes)


def deep_merge(base: dict, update: dict) -> dict:
    """A copy of ``base`` with ``update`` applied key by key, nested mappings merged likewise."""
    out = dict(base)
    for k, v in update.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
        )
    return out


def coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; widen int to float, list to tuple."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail() -> typing.NoReturn:
        raise ConfigError(
            f"{where}: {key} = {value!r} ({type(value).__name__}) does not fit the expected type "
            f"{type_name(tp)}"
        )

    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        fail()
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return coerce(value, arm, key, where)
            except ConfigError:
                continue
        fail()
    if tp is type(None):
        if value is None:
            return None
        fail()
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            fail()
        inner = args[0] if args else Any
        items = [coerce(v, inner, key, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. run.name=256 should stay usable as a name
        fail()
    if isinstance(value, tp):
        return value
    fail()


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def describe_model(cfg: Config) -> str:
    """The model's size in a few words, for progress lines: '3x256x256, 6 levels x 32 steps,
    width 512'."""
    r, m = cfg.data.resolution, cfg.model
    return f"3x{r}x{r}, {m.levels} levels x {m.steps} steps, width {m.width}"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: how the config is logged as MLflow params."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved tree as YAML (readable, and loadable again with --config)."""
    atomic_write_text(path, yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False))
