"""Putting a run together, in one order (docs/design.md §5):

  1. rank 0 does the file work: the checkpoint to resume from (refusing an incompatible config
     before anything slow), the synthetic data if asked for, the shard folder, the TrainState (the
     checkpoint's, or a fresh one with the optimum reference), config.yaml and the MLflow run;
  2. one broadcast gives every rank that bundle (or the error rank 0 met, raised everywhere);
  3. every rank builds loaders, model, optimizer and engine the same way; a fresh start
     initialises ActNorm (identical on every rank) and saves step 0, a resume loads the checkpoint.

The Run it returns holds everything the loop touches. The loop is pipeline/train/loop.py.
"""

from __future__ import annotations

import math
import platform
import signal
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed as dist
from pipeline.config import Config, flatten, save_config, to_dict
from pipeline.data import build_loader, iter_levels, prepare_synthetic, resolve_shards
from pipeline.flows import build_flow
from pipeline.theory.closed_form import optimal_nll
from pipeline.track.sink import MetricsSink
from pipeline.train import checkpoint, compat
from pipeline.train.certificate import Certificate
from pipeline.train.config import FaultConfig, TrainConfig
from pipeline.train.faults import lr_multiplier
from pipeline.train.guard import Guard
from pipeline.train.state import TrainState

PANEL_IMAGES = 8  # the end-of-run panel's columns (train/report.py)


@dataclass
class Bundle:
    """What rank 0 decides and every rank receives: the checkpoint to resume from (None: a fresh
    start) and the config keys it accepts as changed ("key: old -> new"), the shard folder, the
    TrainState to continue from, and the MLflow run (None while the store is unreachable)."""

    latest: checkpoint.Latest | None
    changed: list[str]
    shards: Path
    state: TrainState
    run_id: str | None = None


@dataclass
class Run:
    """Everything one training run holds, built by ``assemble``."""

    cfg: Config
    engine: Any
    optimizer: SkippableAdamW  # ours, not DeepSpeed's wrapper: the guard cancels its next step
    model: torch.nn.Module
    loader: Any  # this rank's infinite, exactly resumable train stream
    val_loader: Any  # this rank's finite share of the val split
    state: TrainState
    guard: Guard
    sink: MetricsSink
    preemption: Preemption
    certificate: Certificate  # the step's spectral-norm certificate, once per step (shared)
    reported_bad_shards: set = field(default_factory=set)
    # the first val images (rank 0, None elsewhere): the sampler check's fixed images, and the
    # final battery's and panel's
    val_images: torch.Tensor | None = None

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

    def event(self, kind: str, **fields) -> None:
        """Record an event that is not the detector's (the guard records those): counted in the
        TrainState, the run's one tally (checkpointed, so a resume counts on exactly), and written
        by the sink, the one writer of events.jsonl and ``events/<kind>``."""
        counts = self.state.event_counts
        counts[kind] = counts.get(kind, 0) + 1
        self.sink.log_event({"kind": kind, "step": self.state.step, **fields}, counts)


def assemble(cfg: Config) -> Run:
    """Data, model, engine, guard and tracking: a fresh start, or a resume from the newest complete
    checkpoint of the run folder if its config is compatible with ``cfg`` (train/compat.py)."""
    torch.manual_seed(cfg.train.seed)  # same on every rank: identical initial weights
    preemption = Preemption()  # before the slow parts: a SIGTERM during set-up is honoured too
    bundle, sink, error = None, None, None
    if dist.is_main():
        try:
            bundle = prepare(cfg, dist.world_size())
            sink = open_sink(cfg, bundle)
            bundle.run_id = sink.run_id
        except Exception as e:  # every rank raises it, so none waits in a collective
            error = e
    bundle, error = dist.broadcast_object((bundle, error))
    if error is not None:
        raise error
    sink = sink or open_sink(cfg, bundle)

    rank, world = dist.rank(), dist.world_size()
    loader = build_loader(cfg.data, bundle.shards, "train", cfg.train.micro_batch, rank, world)
    val_loader = build_loader(cfg.data, bundle.shards, "val", cfg.train.micro_batch, rank, world)
    model = build_model(cfg)
    if bundle.latest is None:
        checksum = initialize_actnorm(model, cfg, bundle.shards)
        dist.say(f"ActNorm data-dependent init identical on {world} rank(s) ({checksum!r})")
    state, guard = bundle.state, cfg.guard
    n_val = max(guard.check_images, guard.battery_images, PANEL_IMAGES)
    val_images = first_images(val_loader, n_val) if dist.is_main() else None
    optimizer, scheduler = build_optimizer(model, cfg.train, cfg.faults, state)
    engine, _, _ = dist.build_engine(model, optimizer, scheduler, cfg.train)
    run = Run(
        cfg,
        engine,
        optimizer,
        model,
        loader,
        val_loader,
        state,
        Guard(guard, state, cfg.train.precision),
        sink,
        preemption,
        Certificate(model, cfg.train.share_certificate),
        val_images=val_images,
    )
    dist.say(run.certificate.describe())
    if bundle.latest is None:
        run.save()  # the initial weights: a good rollback target from the start
        dist.say(f"fresh start; run {cfg.run.dir}")
        return run
    loader.load_state_dict(checkpoint.load(engine, bundle.latest.folder))
    for folder, problem in bundle.latest.damaged:
        run.event("checkpoint_damaged", checkpoint=str(folder), problem=problem)
    dist.say(f"resumed from {bundle.latest.folder} ({bundle.latest.checked}); run {cfg.run.dir}")
    return run


# --- rank 0's file work ---------------------------------------------------------------------------


def prepare(cfg: Config, world_size: int) -> Bundle:
    """The checkpoint to resume from, checked against ``cfg`` first (a ConfigError, one line, if it
    cannot continue under it; a CheckpointError if every complete checkpoint is damaged), then the
    data and the state to continue from."""
    latest, changed = checkpoint.open_latest(cfg.run.dir / "checkpoints"), []
    if latest is not None:
        changed = compat.check_resume(latest.folder, cfg, world_size, latest.world_size)
        if changed:
            dist.say(f"resuming with changed keys: {'; '.join(changed)}")
    save_config(cfg, cfg.run.dir / "config.yaml")
    if cfg.data.source == "synthetic":
        prepare_synthetic(cfg.data)  # written once, atomically
    shards = resolve_shards(cfg.data)
    if latest is not None:
        return Bundle(latest, changed, shards, latest.state)
    # theory/optimum_bpd: the best bpd a linear per-position flow (squeeze 2) reaches on this data
    n_bits, limit, optimum = cfg.data.n_bits, cfg.train.optimum_images, None
    if limit:
        levels = iter_levels(shards, n_bits, split="train", limit=limit)
        optimum = float(optimal_nll(levels, n_bits=n_bits, squeeze=2, hflip=cfg.data.hflip).bpd)
    return Bundle(None, [], shards, TrainState(optimum_bpd=optimum))


def open_sink(cfg: Config, bundle: Bundle) -> MetricsSink:
    """The main rank's sink: the run's MLflow run (the checkpoint's, on a resume), its dataset
    inputs and, on a fresh start, its parameters. On the other ranks a sink that writes nothing;
    local rank 0 of each other node monitors its node's system metrics."""
    main = dist.is_main()
    params = {**flatten(to_dict(cfg)), **run_params()} if main and bundle.latest is None else None
    return MetricsSink(
        cfg.run.dir,
        cfg.tracking,
        main,
        run_name=cfg.run.name,
        run_id=bundle.state.mlflow_run_id if main else bundle.run_id,
        shards=bundle.shards,
        params=params,
        monitor_node=dist.local_rank() == 0,
    )


def run_params() -> dict:
    """What besides the config decides a run: ranks, versions, commit."""
    params = {"run.world_size": dist.world_size(), "run.python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "webdataset", "mlflow", "lipflow"):
        try:
            params[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            params[f"version.{pkg}"] = "not installed"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    params["run.git_commit"] = commit or "unknown"
    return params


# --- every rank -----------------------------------------------------------------------------------


def build_model(cfg: Config) -> torch.nn.Module:
    """The flow on this rank's device; with ``train.compile``, its forward compiled in place
    (``Module.compile``: parameter names, and so checkpoints, stay those of the eager model)."""
    r = cfg.data.resolution
    model = build_flow(cfg.model, (3, r, r), cfg.data.n_bits).to(dist.device())
    if cfg.train.compile:
        model.compile(dynamic=False)  # one image shape per run: no dynamic-shape guards
    return model


@torch.no_grad()
def initialize_actnorm(model: torch.nn.Module, cfg: Config, shards: Path) -> float:
    """ActNorm's data-dependent init (docs/design.md §8.9) from the first batches of rank 0's
    stream, on every rank: every rank reads the same batches (a one-rank view of the train split)
    and runs the same deterministic computation, so the parameters agree without a broadcast.
    Fails loudly unless they do; returns their checksum.

    The checksum sums each tensor weighted by its position, in float64, so both a changed value and
    swapped tensors change it; ranks compare it by all-reducing its max and min.
    """
    loader = build_loader(cfg.data, shards, "train", cfg.train.micro_batch, rank=0, world_size=1)
    batches = iter(loader)
    x = torch.cat([next(batches) for _ in range(max(1, cfg.train.init_batches))])
    model.data_init(x.to(dist.device()))
    total = torch.zeros(1, dtype=torch.float64)
    for i, p in enumerate(model.state_dict().values()):
        if p.is_floating_point():
            weights = torch.arange(1, p.numel() + 1, dtype=torch.float64)
            total += (i + 1) * (p.detach().double().cpu().flatten() * weights).sum()
    hi, lo = dist.all_reduce(total.clone(), "max"), dist.all_reduce(total.clone(), "min")
    if hi.item() != lo.item():
        raise RuntimeError(
            f"ActNorm init differs across ranks (checksums {lo.item()!r} .. {hi.item()!r}): the "
            "init batches or the model code are not deterministic; check data.seed and data.workers"
        )
    return total.item()


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next step can be cancelled: how the guard skips a step on every ZeRO stage.

    DeepSpeed calls ``step()`` on the optimizer it was given (directly at ZeRO 0, on the fp32
    partitions at ZeRO 1/2), so a cancelled step leaves weights and Adam moments exactly as they were.
    """

    skip_next = False

    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def build_optimizer(
    model: torch.nn.Module, train: TrainConfig, faults: FaultConfig, state: TrainState
):
    """Plain torch AdamW (DeepSpeed's fused optimizers need a compiler step on CPU) + LR schedule.

    lr(step) = lr · state.lr_scale · warm-up/cosine(step): ``lr_scale`` is the product of the guard's
    rollback cuts, kept in the TrainState so that a checkpoint carries it.
    """
    optimizer = SkippableAdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)

    def factor(step: int) -> float:
        scale = state.lr_scale * lr_multiplier(faults, step)
        if train.warmup_steps and step < train.warmup_steps:
            return scale * (step + 1) / train.warmup_steps
        if train.lr_decay == "none":
            return scale
        span = max(1, train.steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return scale * (train.min_lr_ratio + (1.0 - train.min_lr_ratio) * cosine)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
