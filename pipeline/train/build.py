"""Builders for the training loop: data, model, optimizer, tracking. Each does one thing."""

from __future__ import annotations

import math
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pipeline import distributed as dist
from pipeline.config import Config
from pipeline.data import build_loader, iter_levels, prepare_synthetic, resolve_shards
from pipeline.flows import build_flow
from pipeline.theory.closed_form import optimal_nll
from pipeline.track import system
from pipeline.track.config import TrackingConfig
from pipeline.track.sink import MetricsSink
from pipeline.train.config import FaultConfig, TrainConfig
from pipeline.train.faults import lr_multiplier
from pipeline.train.state import TrainState


class Data(NamedTuple):
    shards: Path  # the resolution's shard folder
    train: Any  # this rank's infinite, exactly resumable train stream
    val: Any  # this rank's finite share of the val split


def build_data(cfg: Config) -> Data:
    if cfg.data.source == "synthetic" and dist.is_main():
        prepare_synthetic(cfg.data)  # writes once, atomically; the others wait at the barrier
    dist.barrier()
    shards = resolve_shards(cfg.data)
    rank, world = dist.rank(), dist.world_size()
    train = build_loader(cfg.data, shards, "train", cfg.train.micro_batch, rank, world)
    val = build_loader(cfg.data, shards, "val", cfg.train.micro_batch, rank, world)
    return Data(shards, train, val)


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
    """ActNorm's data-dependent init from the first batches of rank 0's stream, on every rank.

    Every rank reads the same batches (a one-rank view of the train split) and runs the same
    deterministic computation, so the parameters agree without a broadcast.
    """
    loader = build_loader(cfg.data, shards, "train", cfg.train.micro_batch, rank=0, world_size=1)
    batches = iter(loader)
    x = torch.cat([next(batches) for _ in range(max(1, cfg.train.init_batches))])
    model.data_init(x.to(dist.device()))
    return check_replicated(model)


def check_replicated(model: torch.nn.Module) -> float:
    """Fail loudly unless every rank holds bit-identical parameters; return their checksum.

    The checksum sums each tensor weighted by its position, in float64, so both a changed value and
    swapped tensors change it; ranks compare it by all-reducing its max and min.
    """
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


def build_optimum(cfg: Config, shards: Path) -> float | None:
    """theory/optimum_bpd: the best bpd a linear per-position flow (squeeze 2) can reach on this data.

    Computed on rank 0 from up to ``train.optimum_images`` train images, broadcast to all ranks.
    """
    if not cfg.train.optimum_images:
        return None
    value = None
    if dist.is_main():
        levels = iter_levels(shards, cfg.data.n_bits, split="train", limit=cfg.train.optimum_images)
        optimum = optimal_nll(levels, n_bits=cfg.data.n_bits, squeeze=2, hflip=cfg.data.hflip)
        value = float(optimum.bpd)
    return dist.broadcast_object(value)


def build_sink(cfg: Config, state: TrainState) -> MetricsSink:
    return MetricsSink(
        cfg.run.dir, cfg.tracking, dist.is_main(), run_name=cfg.run.name, run_id=state.mlflow_run_id
    )


def build_node_monitor(tracking: TrackingConfig, sink: MetricsSink):
    """MLflow system metrics of the other nodes: local rank 0 of each node but the main one.

    The main rank's sink monitors its own node. Other nodes can only reach a shared store (a tracking
    server), not the main node's SQLite file, and only once the run exists.
    """
    run_id = dist.broadcast_object(sink.run_id)
    shared_store = not sink.uri.startswith(("sqlite:", "file:")) and "://" in sink.uri
    if dist.is_main() or dist.local_rank() != 0 or not run_id or not shared_store:
        return None
    if not system.wanted(tracking.system_metrics):
        return None
    return system.start_monitor(sink.uri, run_id, tracking.system_metrics_interval_s)


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
