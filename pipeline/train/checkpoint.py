"""Checkpoints: DeepSpeed engine state + TrainState + resolved config, one step-numbered folder each.

    <run>/checkpoints/step00000040/   DeepSpeed's files (every rank writes its part)
                                       trainstate.json, config.yaml, COMPLETE,
                                       rank<r>.json (data position), rng-rank<r>.pt (per rank)
    <run>/checkpoints/latest           the newest COMPLETE tag, replaced atomically

A folder without COMPLETE was cut short (killed mid-save) and is never resumed from.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline import distributed as dist
from pipeline.config import Config, save_config
from pipeline.io import atomic_write_text
from pipeline.train.state import TrainState

COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(folder: Path) -> int:
    """The step a checkpoint folder holds: the inverse of ``tag_for``."""
    name = Path(folder).name
    if not (name.startswith("step") and name[4:].isdigit()):
        raise ValueError(f"{folder} is not a checkpoint folder (expected {tag_for(0)}-style names)")
    return int(name[4:])


def complete_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(tags)


def find_latest(root: Path) -> Path | None:
    """The folder `latest` names, if complete; else the newest complete one; else None."""
    pointer = root / "latest"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (root / tag / COMPLETE).is_file():
            return root / tag
    tags = complete_tags(root)
    return root / tags[-1] if tags else None


def find_good(root: Path, before: int | None = None) -> Path | None:
    """The newest complete checkpoint saved with no guard event in its window (a rollback target),
    optionally only among those older than step ``before``."""
    for tag in reversed(complete_tags(root)):
        state = json.loads((root / tag / "trainstate.json").read_text())
        if before is not None and state["step"] >= before:
            continue
        if not state.get("suspect", False):
            return root / tag
    return None


def rotated_out(root: Path, keep_last: int) -> list[str]:
    """The complete checkpoints beyond the newest ``keep_last`` (0 keeps all), except the guard's
    rollback targets: the initial weights (step 0, which no training step can have damaged) and
    the newest good checkpoint. So however far rotation has gone, the guard's escalation can reach
    its configured depth instead of stopping for want of a target."""
    if keep_last <= 0:
        return []
    good = find_good(root)
    keep = {tag_for(0), good.name if good is not None else None}
    return [tag for tag in complete_tags(root)[:-keep_last] if tag not in keep]


def mark_suspect(folder: Path) -> None:
    """Exclude a checkpoint from rollbacks (rank 0 only; the others need not know)."""
    if dist.is_main():
        path = folder / "trainstate.json"
        state = json.loads(path.read_text())
        state["suspect"] = True
        atomic_write_text(path, json.dumps(state, indent=1))


def saved_world_size(folder: Path) -> int:
    """The number of ranks that wrote ``folder`` (each writes its rank<r>.json)."""
    return len(list(folder.glob("rank*.json")))


def save(
    engine, state: TrainState, cfg: Config, root: Path, keep_last: int, data_position: dict
) -> Path:
    """Every rank must call this (DeepSpeed's save is a collective); ``data_position`` is this rank's."""
    tag = tag_for(state.step)
    folder = root / tag
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    atomic_write_text(folder / f"rank{dist.rank()}.json", json.dumps(data_position))
    rng = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate())}
    torch.save(rng, folder / f"rng-rank{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        atomic_write_text(folder / "trainstate.json", json.dumps(asdict(state), indent=1))
        save_config(cfg, folder / "config.yaml")
        atomic_write_text(folder / COMPLETE, "")
        atomic_write_text(root / "latest", tag)
        for old in rotated_out(root, keep_last):
            shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return folder


def load_engine(engine, folder: Path) -> None:
    """Restore module, optimizer and LR scheduler (all ranks: DeepSpeed's load is a collective)."""
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if path is None:
        raise FileNotFoundError(
            f"DeepSpeed found no checkpoint in {folder}; delete that folder or pick another"
        )


def read_state(folder: Path) -> TrainState:
    """The TrainState a checkpoint holds (a plain file: readable before the engine exists)."""
    return TrainState(**json.loads((folder / "trainstate.json").read_text()))


def load(engine, folder: Path) -> dict:
    """Restore engine, optimizer, scheduler and this rank's RNG; return this rank's data position."""
    load_engine(engine, folder)
    rng_file = folder / f"rng-rank{dist.rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_tuples(json.loads(rng["python"])))
    position_file = folder / f"rank{dist.rank()}.json"
    if not position_file.is_file():
        raise FileNotFoundError(
            f"{position_file} is missing: this checkpoint was written by a run with fewer ranks; "
            "resume with the same number of ranks"
        )
    return json.loads(position_file.read_text())


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, list) else x
