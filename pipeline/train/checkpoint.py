"""Checkpoints: DeepSpeed engine state + TrainState + resolved config, one step-numbered folder each.

    <run>/checkpoints/step00000040/   DeepSpeed's files (every rank writes its part)
                                       trainstate.json, config.yaml,
                                       rank<r>.json (data position), rng-rank<r>.pt (per rank),
                                       COMPLETE (the manifest: size and sha256 of every file above)
                                       SUSPECT (only if the guard found it bad after the save)
    <run>/checkpoints/latest           the newest COMPLETE tag, replaced atomically

A folder without COMPLETE was cut short (killed mid-save) and is never resumed from; one whose files
no longer match its COMPLETE manifest (damaged after the save) is skipped for the previous one. A
COMPLETE written before manifests existed is empty: its checkpoint is accepted unverified.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from pipeline import distributed as dist
from pipeline.config import Config, save_config
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_text, sha256_file
from pipeline.train.state import TrainState

COMPLETE = "COMPLETE"
SUSPECT = "SUSPECT"
MANIFEST_VERSION = 1


class CheckpointError(PipelineError, RuntimeError):
    """A checkpoint that cannot be written or resumed from; the message (one line) says what to do."""


class DiskFullError(CheckpointError):
    """A save that failed for lack of space; its partial folder is gone, `latest` is unchanged."""


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


# --- the manifest ---------------------------------------------------------------------------------


def write_manifest(folder: Path) -> dict:
    """COMPLETE as {"version", "files": {relative path: {"size", "sha256"}}} over every file the
    ranks wrote into ``folder`` (rank 0, after the barrier: the folder is on a filesystem every rank
    shares). Written last, atomically: its presence still means "complete"."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in (COMPLETE, SUSPECT) or path.name.startswith("."):  # markers, temporaries
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"version": MANIFEST_VERSION, "files": files}
    atomic_write_text(folder / COMPLETE, json.dumps(manifest, indent=1))
    return manifest


def read_complete(folder: Path) -> dict | None:
    """The folder's manifest; None for an old-format (empty) COMPLETE, which lists nothing."""
    text = (folder / COMPLETE).read_text()
    if not text.strip():
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError:
        return {"files": {}, "error": f"{COMPLETE} is not valid JSON"}
    return manifest if isinstance(manifest, dict) else {"files": {}, "error": f"{COMPLETE} is odd"}


def first_mismatch(folder: Path) -> str | None:
    """None if every file the manifest lists is there with its size and sha256 (or the COMPLETE is
    old-format, with nothing to check); else the first mismatch, e.g. "mp_rank_00_model_states.pt:
    100 bytes, the manifest says 328647"."""
    manifest = read_complete(folder)
    if manifest is None:
        return None
    if "error" in manifest:
        return manifest["error"]
    for rel, expected in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            return f"{rel}: missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{rel}: {size} bytes, the manifest says {expected['size']}"
        if sha256_file(path) != expected["sha256"]:
            return f"{rel}: sha256 differs from the manifest's"
    return None


def describe_check(folder: Path, seconds: float) -> str:
    """How ``folder`` was checked, for the resume line: files, bytes and time, or unverified."""
    manifest = read_complete(folder)
    if manifest is None:
        return f"old-format {COMPLETE} without checksums: not verified"
    files = manifest.get("files", {})
    size = sum(f["size"] for f in files.values())
    return f"{len(files)} files, {size / 1e6:.2f} MB verified in {seconds:.3f} s"


# --- finding checkpoints --------------------------------------------------------------------------


def find_latest(root: Path, damaged: list | None = None) -> Path | None:
    """The checkpoint to resume from: the one `latest` names if it is complete and its files match
    its manifest, else the newest such one; None if there is none. Every complete checkpoint passed
    over for a mismatch is appended to ``damaged`` as (folder, first mismatch)."""
    pointer = root / "latest"
    tags = complete_tags(root)[::-1]
    if pointer.is_file():
        named = pointer.read_text().strip()
        if named in tags:
            tags.remove(named)
            tags.insert(0, named)
    for tag in tags:
        problem = first_mismatch(root / tag)
        if problem is None:
            return root / tag
        if damaged is not None:
            damaged.append((root / tag, problem))
    return None


@dataclass
class Latest:
    """The checkpoint a run resumes from: its folder, TrainState, the ranks that wrote it, how it
    was verified, and the newer complete checkpoints passed over as damaged (folder, mismatch)."""

    folder: Path
    state: TrainState
    world_size: int
    checked: str
    damaged: list = field(default_factory=list)


def open_latest(root: Path) -> Latest | None:
    """``find_latest``'s checkpoint with what a resume needs to know before the engine exists;
    None if ``root`` holds none, a CheckpointError (one line: what to do) if every complete one is
    damaged."""
    damaged, start = [], time.perf_counter()
    folder = find_latest(root, damaged)
    seconds = time.perf_counter() - start
    for bad, problem in damaged:
        dist.say(f"checkpoint {bad} is damaged ({problem}); falling back to the one before it")
    if folder is None and damaged:
        raise CheckpointError(
            f"every complete checkpoint in {root} is damaged (the newest, {damaged[0][0].name}: "
            f"{damaged[0][1]}); restore them from a copy, or use a new run.name to start afresh"
        )
    if folder is None:
        return None
    checked = describe_check(folder, seconds)
    return Latest(folder, read_state(folder), saved_world_size(folder), checked, damaged)


def is_suspect(folder: Path) -> bool:
    """Saved with guard events in its window, or marked bad by the guard since."""
    state = json.loads((folder / "trainstate.json").read_text())
    return bool(state.get("suspect", False)) or (folder / SUSPECT).is_file()


def find_good(
    root: Path, before: int | None = None, verify_files: bool = True, damaged: list | None = None
) -> Path | None:
    """The newest complete checkpoint saved with no guard event in its window (a rollback target),
    optionally only among those older than step ``before``. With ``verify_files`` a checkpoint must
    also match its manifest (one that does not is appended to ``damaged``); rotation, which only
    decides what to keep, skips that cost."""
    for tag in reversed(complete_tags(root)):
        folder = root / tag
        if before is not None and step_of(folder) >= before:
            continue
        if is_suspect(folder):
            continue
        problem = first_mismatch(folder) if verify_files else None
        if problem is None:
            return folder
        if damaged is not None:
            damaged.append((folder, problem))
    return None


def rotated_out(root: Path, keep_last: int) -> list[str]:
    """The complete checkpoints beyond the newest ``keep_last`` (0 keeps all), except the guard's
    rollback targets: the initial weights (step 0, which no training step can have damaged) and
    the newest good checkpoint. So however far rotation has gone, the guard's escalation can reach
    its configured depth instead of stopping for want of a target."""
    if keep_last <= 0:
        return []
    good = find_good(root, verify_files=False)
    keep = {tag_for(0), good.name if good is not None else None}
    return [tag for tag in complete_tags(root)[:-keep_last] if tag not in keep]


def mark_suspect(folder: Path) -> None:
    """Exclude a checkpoint from rollbacks (rank 0 only; the others need not know). A marker file
    beside the manifest, so the files the manifest lists stay as they were saved."""
    if dist.is_main():
        atomic_write_text(folder / SUSPECT, "events recurred right after a rollback to it\n")


def saved_world_size(folder: Path) -> int:
    """The number of ranks that wrote ``folder`` (each writes its rank<r>.json)."""
    return len(list(folder.glob("rank*.json")))


# --- save and load --------------------------------------------------------------------------------


def save(
    engine, state: TrainState, cfg: Config, root: Path, keep_last: int, data_position: dict
) -> Path:
    """Every rank must call this (DeepSpeed's save is a collective); ``data_position`` is this rank's.

    A rank whose part fails removes the partial folder and raises: a DiskFullError naming the
    path and the bytes free when the filesystem is full, else the original error. It raises before
    the barrier ahead of COMPLETE, so no rank can mark that folder complete; the others are stopped
    by the launcher (or wait in their next collective until the group's timeout).
    """
    tag = tag_for(state.step)
    folder = root / tag
    if dist.is_main() and folder.exists():  # a save of this step cut short, or damaged: not ours
        shutil.rmtree(folder)
    dist.barrier()
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        atomic_write_text(folder / f"rank{dist.rank()}.json", json.dumps(data_position))
        rng = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate())}
        torch.save(rng, folder / f"rng-rank{dist.rank()}.pt")
    except Exception as error:
        if (full := save_failed(folder, error)) is None:
            raise
        raise full from error
    dist.barrier()
    if dist.is_main():
        try:
            atomic_write_text(folder / "trainstate.json", json.dumps(asdict(state), indent=1))
            save_config(cfg, folder / "config.yaml")
            write_manifest(folder)
            atomic_write_text(root / "latest", tag)
        except Exception as error:
            if (full := save_failed(folder, error)) is None:
                raise
            raise full from error
        for old in rotated_out(root, keep_last):
            shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return folder


def save_failed(folder: Path, error: BaseException) -> DiskFullError | None:
    """Remove the partial ``folder``. Returns a DiskFullError (path, bytes free, what to do) if
    the filesystem is full: ENOSPC or EDQUOT anywhere in the chain, or less free at the failure
    than a checkpoint of this run takes (torch's writer reports a full disk as "unexpected pos
    ..."); else None: ``error`` stands as it is."""
    root = folder.parent
    need = checkpoint_bytes(root, exclude=folder.name)
    free_at_failure = free_bytes(root)
    for e in chain(error):  # the failed writer, still open in a frame, would hold its space
        traceback.clear_frames(e.__traceback__)
    shutil.rmtree(folder, ignore_errors=True)
    full = any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for e in chain(error))
    if not (full or free_at_failure < need):
        return None
    latest = root / "latest"
    named = latest.read_text().strip() if latest.is_file() else "nothing yet"
    return DiskFullError(
        f"no space left to save checkpoint {folder}: {free_bytes(root):,} bytes free on its "
        f"filesystem (a checkpoint of this run takes about {need:,}); the partial folder was "
        f"removed and {latest} still names {named}. Free space (or keep fewer: train.keep_last) "
        "and run the same command again to resume"
    )


def chain(error: BaseException):
    """``error`` and the exceptions it was raised from or during."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path if path.exists() else path.parent).free


def checkpoint_bytes(root: Path, exclude: str = "") -> int:
    """The size of the newest complete checkpoint but ``exclude`` (1 MiB if there is none yet)."""
    for tag in reversed(complete_tags(root)):
        if tag != exclude:
            return sum(p.stat().st_size for p in (root / tag).rglob("*") if p.is_file())
    return 2**20


def load_engine(engine, folder: Path) -> None:
    """Restore module, optimizer and LR scheduler (all ranks: DeepSpeed's load is a collective)."""
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if path is None:
        raise FileNotFoundError(
            f"DeepSpeed found no checkpoint in {folder}; delete that folder or pick another"
        )


def read_state(folder: Path) -> TrainState:
    """The TrainState a checkpoint holds (a plain file: readable before the engine exists); a
    field it holds that TrainState no longer has is dropped."""
    saved = json.loads((folder / "trainstate.json").read_text())
    return TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})


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
