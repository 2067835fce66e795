"""Putting a run together: the checkpoint to resume from (if any), data, model, engine, guard and
tracking, as a fresh start or a resume; the Run they make up, and the preemption flag. The loop
itself is pipeline/train/loop.py; the builders it calls are in build.py.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed as dist
from pipeline.config import Config, flatten, save_config, to_dict
from pipeline.train import checkpoint, compat
from pipeline.train.build import (
    Data,
    SkippableAdamW,
    build_data,
    build_model,
    build_node_monitor,
    build_optimizer,
    build_optimum,
    build_sink,
    initialize_actnorm,
    run_params,
)
from pipeline.train.guard import Guard
from pipeline.train.state import TrainState


@dataclass
class Run:
    """Everything one training run holds, built by ``build_run``."""

    cfg: Config
    engine: Any
    optimizer: SkippableAdamW  # ours, not DeepSpeed's wrapper: the guard cancels its next step
    model: torch.nn.Module
    loader: Any
    val_loader: Any
    state: TrainState
    guard: Guard
    sink: Any
    preemption: Preemption
    node_monitor: Any = None
    reported_bad_shards: set = field(default_factory=set)
    # the sampler check's fixed val images (rank 0; None elsewhere or with guard.check_images=0)
    check_images: torch.Tensor | None = None

    @property
    def ckpt_root(self) -> Path:
        return self.cfg.run.dir / "checkpoints"

    def save(self) -> None:
        self.state.suspect = bool(self.state.recent_events)
        self.state.mlflow_run_id = self.sink.run_id if dist.is_main() else None
        checkpoint.save(
            self.engine,
            self.state,
            self.cfg,
            self.ckpt_root,
            self.cfg.train.keep_last,
            self.loader.state_dict(),
        )


def build_run(cfg: Config) -> Run:
    """Data, model, engine, guard and tracking: a fresh start, or a resume from the newest complete
    checkpoint of the run folder if its config is compatible with ``cfg`` (train/compat.py)."""
    torch.manual_seed(cfg.train.seed)  # same on every rank: identical initial weights
    found = on_main(choose_checkpoint, cfg, dist.world_size())  # before any work: it may refuse
    if dist.is_main():
        save_config(cfg, cfg.run.dir / "config.yaml")
    preemption = Preemption()  # before the slow parts: a SIGTERM during set-up is honoured too
    data, model = build_data(cfg), build_model(cfg)
    if found.folder is None:
        return start_fresh(cfg, model, data, preemption)
    return resume(cfg, model, data, found, preemption)


@dataclass
class Found:
    """The checkpoint a run resumes from (None: a fresh start), the config keys it accepts as
    changed since that checkpoint ("key: old -> new"), the newer complete checkpoints passed over
    as damaged (folder, first mismatch), and how the folder was verified."""

    folder: Path | None
    changed: list[str] = field(default_factory=list)
    damaged: list[tuple[Path, str]] = field(default_factory=list)
    checked: str = ""


def choose_checkpoint(cfg: Config, world_size: int) -> Found:
    """The newest complete checkpoint of the run folder whose files match its manifest, checked
    against ``cfg``: a ConfigError (one line: the differing keys, what to do) if it cannot continue
    under it, a CheckpointError if every complete checkpoint is damaged."""
    root, damaged = cfg.run.dir / "checkpoints", []
    start = time.perf_counter()
    folder = checkpoint.find_latest(root, damaged)
    seconds = time.perf_counter() - start
    for bad, problem in damaged:
        say(f"checkpoint {bad} is damaged ({problem}); falling back to the one before it")
    if folder is None and damaged:
        raise checkpoint.CheckpointError(
            f"every complete checkpoint in {root} is damaged (the newest, {damaged[0][0].name}: "
            f"{damaged[0][1]}); restore them from a copy, or use a new run.name to start afresh"
        )
    if folder is None:
        return Found(None)
    changed = compat.check_resume(folder, cfg, world_size, checkpoint.saved_world_size(folder))
    return Found(folder, changed, damaged, checkpoint.describe_check(folder, seconds))


def on_main(fn, *args):
    """``fn(*args)`` on rank 0, its result (or the exception it raised) on every rank: file checks
    done once, and one decision, so no rank is left waiting in a collective the others skipped."""
    outcome = (None, None)
    if dist.is_main():
        try:
            outcome = (fn(*args), None)
        except Exception as error:
            outcome = (None, error)
    result, error = dist.broadcast_object(outcome)
    if error is not None:
        raise error
    return result


def start_fresh(cfg: Config, model, data: Data, preemption: Preemption) -> Run:
    """Explicit ActNorm init (identical on all ranks, docs/design.md §8.9), the optimum reference, the
    run's parameters, and a step-0 checkpoint: a good rollback target from the start."""
    checksum = initialize_actnorm(model, cfg, data.shards)
    say(f"ActNorm data-dependent init identical on {dist.world_size()} rank(s) ({checksum!r})")
    state = TrainState(optimum_bpd=build_optimum(cfg, data.shards))
    run = assemble(cfg, model, state, data, preemption)
    run.sink.log_params({**flatten(to_dict(cfg)), **run_params()})
    run.save()
    say(f"fresh start; run {cfg.run.dir}")
    return run


def resume(cfg: Config, model, data: Data, found: Found, preemption: Preemption) -> Run:
    """Weights, optimizer, LR schedule, RNG, data position and TrainState from ``found.folder``."""
    folder = found.folder
    if found.changed:
        say(f"resuming with changed keys: {'; '.join(found.changed)}")
    state = checkpoint.read_state(folder)  # first: the LR schedule and the sink read it
    run = assemble(cfg, model, state, data, preemption)
    data.train.load_state_dict(checkpoint.load(run.engine, folder))
    for bad, problem in found.damaged:
        log_damaged(run, bad, problem)
    say(f"resumed from {folder} ({found.checked}); run {cfg.run.dir}")
    return run


def assemble(cfg: Config, model, state: TrainState, data: Data, preemption: Preemption) -> Run:
    """The engine around ``model`` and the run's guard and tracking, for ``state``."""
    optimizer, scheduler = build_optimizer(model, cfg.train, cfg.faults, state)
    engine, _, _ = dist.build_engine(model, optimizer, scheduler, cfg.train)
    sink = build_sink(cfg, state)
    n_check = cfg.guard.check_images
    return Run(
        cfg,
        engine,
        optimizer,
        model,
        data.train,
        data.val,
        state,
        Guard(cfg.guard, state, cfg.train.precision),
        sink,
        preemption,
        node_monitor=build_node_monitor(cfg.tracking, sink),
        check_images=first_images(data.val, n_check) if n_check and dist.is_main() else None,
    )


def first_images(loader, n: int) -> torch.Tensor | None:
    """The first ``n`` images of a finite loader's pass (fewer if it holds fewer; None if none),
    on this rank's device: the same images whenever asked (a val loader's ``iter()`` would finish
    the pass it is in, which a validation cut short by train.val_batches leaves part-read). The
    loader's position is left as it was, so the next validation sees what it would have."""
    position, batches = loader.state_dict(), []
    start = {**position, "batches": 0, "samples": 0}
    loader.load_state_dict({**start, "reader_positions": [0] * len(position["reader_positions"])})
    try:
        for x in loader:
            batches.append(x)
            if sum(len(b) for b in batches) >= n:
                break
    finally:
        loader.load_state_dict(position)
    return torch.cat(batches)[:n].to(dist.device()) if batches else None


def log_damaged(run: Run, folder: Path, problem: str) -> None:
    """A checkpoint whose files no longer match its manifest, as the event checkpoint_damaged."""
    event = {"kind": "checkpoint_damaged", "step": run.state.step, "checkpoint": str(folder)}
    run.sink.log_event({**event, "problem": problem})


class Preemption:
    """SIGTERM (preemption, SLURM --signal) -> checkpoint at the end of the current step, exit 0.

    The handler only sets a flag; the flag is all-reduced with the step's loss, so every rank stops
    after the same step and takes part in the same checkpoint collective.
    """

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def uninstall(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def say(msg: str) -> None:
    if dist.is_main():
        print(msg, flush=True)
