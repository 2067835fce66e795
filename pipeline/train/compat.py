"""Which config changes a checkpoint can be resumed under.

A run folder resumes under the config of the command that resumes it; every checkpoint holds the
config it was trained with (config.yaml). The two are compared key by key before any work:

- SAFE_TO_CHANGE: keys that only steer how the run goes on from the checkpoint (its length, the LR
  schedule, logging/validation/sampling/saving cadence, tracking, the guard). Accepted, and
  reported ("resuming with changed keys: ...").
- OVERRIDABLE: keys the checkpoint loads under unchanged but that change the optimisation or the
  numerics the run was trained with (weight decay, clipping, precision, how activations are kept,
  compiled kernels, DeepSpeed's own knobs), or name a path whose content the data loader checks
  itself (data.shards). Refused, unless the command names them in
  ``train.allow_changed=key1,key2``: a deliberate override.
- everything else: keys that change what the checkpoint holds or what the data stream yields next
  (model shapes and blocks, data.*, train.micro_batch, grad_accum, global_batch, seed,
  zero_stage), keys this module has not heard of, and the number of ranks. Refused; the way on is
  a new run.name (train.allow_changed does not lift these: the weights, the optimizer shards or
  the stream position would not fit).

The refusal is one line: every refused `key: checkpoint value -> new value` and what to do.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ADDED, MOVED, REMOVED, Config, ConfigError, flatten, to_dict

# key pattern -> why a change is harmless on resume.
SAFE_TO_CHANGE: dict[str, str] = {
    "run.*": "where the run folder lives, not what it holds",
    "tracking.*": "where metrics go",
    "guard.*": "the divergence guard's thresholds, policy and diagnostics cadence",
    "faults.*": "deliberate faults for tests",
    "train.steps": "the run's length (the cosine schedule stretches to it)",
    "train.lr": "the LR schedule",
    "train.warmup_steps": "the LR schedule",
    "train.lr_decay": "the LR schedule",
    "train.min_lr_ratio": "the LR schedule",
    "train.log_every": "logging cadence",
    "train.save_every": "saving cadence",
    "train.keep_last": "checkpoint rotation",
    "train.val_every": "validation cadence",
    "train.val_batches": "validation size",
    "train.sample_every": "sampling cadence",
    "train.samples": "the sample grid",
    "train.temperature": "the sample grid",
    "train.init_batches": "read only by a fresh start (the ActNorm init)",
    "train.optimum_images": "read only by a fresh start (the optimum is in the TrainState)",
    "train.allow_changed": "this override itself",
    "train.share_certificate": "who computes the certificates, not what they are (bit for bit)",
    "data.cache": "where the synthetic set is cached; the other data keys fix its content",
}

# key -> what it changes; refused unless named in train.allow_changed.
OVERRIDABLE: dict[str, str] = {
    "train.weight_decay": "the optimisation (the optimizer state loads unchanged)",
    "train.grad_clip": "the optimisation (the optimizer state loads unchanged)",
    "train.precision": "the numerics of the subnets (master weights are fp32 either way)",
    "model.memory": "how activations are kept for backward (same weights, other rounding)",
    "train.compile": "the kernels the steps run (Inductor-fused: same weights, other rounding)",
    "model.residual_tol": "the accuracy of the residual blocks' inverse",
    "model.residual_max_iter": "the accuracy of the residual blocks' inverse",
    "data.shards": "the shard folder's path (the loader checks that the content is the same)",
    "train.deepspeed.*": "DeepSpeed's own knobs (communication, profiling, ...)",
}


def matches(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def allowed_keys(cfg: Config) -> set[str]:
    return {k.strip() for k in cfg.train.allow_changed.split(",") if k.strip()}


def differences(saved: dict, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint value, new value) for every key that differs, in the order of the tree;
    a key only one side has shows ``"(absent)"`` on the other. Keys the tree has since moved
    (pipeline.config.MOVED) are compared under their new name, keys it has since added
    (pipeline.config.ADDED) at the value the checkpoint was trained with, keys it has since
    removed (pipeline.config.REMOVED) not at all."""
    kept = {k: v for k, v in flatten(saved).items() if k not in REMOVED}
    old = {**ADDED, **{MOVED.get(k, k): v for k, v in kept.items()}}
    new = flatten(json.loads(json.dumps(to_dict(cfg))))  # as save_config writes it (no tuples)
    absent = "(absent)"
    keys = list(new) + [k for k in old if k not in new]
    pairs = [(k, old.get(k, absent), new.get(k, absent)) for k in keys]
    return [(k, a, b) for k, a, b in pairs if a != b]


def check_resume(folder: Path, cfg: Config, world_size: int, saved_world_size: int) -> list[str]:
    """The accepted changes of ``cfg`` against the config ``folder`` was saved with, as
    "key: old -> new"; a ConfigError (one line) if any change is refused (see the module's doc)."""
    path = folder / "config.yaml"
    if not path.is_file():  # every save writes it before COMPLETE
        raise ConfigError(f"{path} is missing: no config to compare with; use a new run.name")
    allowed = allowed_keys(cfg)
    accepted, overridable, refused = [], [], []
    for key, old, new in differences(yaml.safe_load(path.read_text()) or {}, cfg):
        line = f"{key}: {old!r} -> {new!r}"
        if matches(key, SAFE_TO_CHANGE) or (matches(key, OVERRIDABLE) and key in allowed):
            accepted.append(line)
        else:
            (overridable if matches(key, OVERRIDABLE) else refused).append((key, line))
    if saved_world_size and saved_world_size != world_size:
        refused.append(("ranks", f"ranks: {saved_world_size} -> {world_size}"))
    if not overridable and not refused:
        return accepted
    if [k for k, _ in refused] == ["ranks"]:
        advice = f"resume with {saved_world_size} ranks, or use a new run.name"
    elif refused:  # train.allow_changed cannot lift these
        advice = "use a new run.name to start a new run in its own folder"
    else:
        keys = ",".join(k for k, _ in overridable)
        advice = (
            f"add train.allow_changed={keys} if the change is deliberate, or use a new run.name"
        )
    listed = "; ".join(line for _, line in refused + overridable)
    raise ConfigError(
        f"{folder} was trained with a different config, and these changes would alter the model, "
        f"the data stream or the optimizer: {listed}. To go on: {advice}"
    )
