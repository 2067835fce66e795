"""Deliberate faults (``cfg.faults``), all in one place: how the tests drive the guard, rollbacks,
preemption and exact resume end to end through the real loop. Every hook is a no-op by default."""

from __future__ import annotations

import math
import os
import signal

import torch

from pipeline import distributed as dist
from pipeline.train.config import FaultConfig


def corrupt_batch(faults: FaultConfig, x: torch.Tensor, step: int) -> torch.Tensor:
    """faults.nan_step: rank faults.nan_rank feeds a NaN batch at that (1-based) step."""
    if step == faults.nan_step and dist.rank() == faults.nan_rank:
        return x * math.nan
    return x


def lr_multiplier(faults: FaultConfig, index: int) -> float:
    """faults.lr_spike_*: the LR times lr_spike_factor for lr_spike_steps steps from lr_spike_step
    (``index`` is the scheduler's 0-based step index, so step s has index s - 1)."""
    first = faults.lr_spike_step - 1
    return faults.lr_spike_factor if first <= index < first + faults.lr_spike_steps else 1.0


def maybe_kill(faults: FaultConfig, step: int) -> None:
    """faults.sigkill_step: right after that step's checkpoint every rank dies as in a node crash."""
    if step == faults.sigkill_step:
        os.kill(os.getpid(), signal.SIGKILL)


@torch.no_grad()
def maybe_damage_prior(faults: FaultConfig, model: torch.nn.Module, step: int) -> None:
    """faults.damage_step: right after that step's update, on every rank alike, the first log σ
    channel of each learned split prior gets the bias ``damage_log_std``: the study's damaged run
    (docs/studies.md §1) made deterministic. The loss jumps once (each such z coordinate costs
    about that many nats) and the weights stay damaged; with an unbounded prior
    (model.prior_log_std_bound=0) σ = e^1000 overflows even float64 (the battery's), so every
    sample is non-finite, while the loss, the gradients and the log-dets stay finite (the density
    needs only e^-1000, which is 0). A bounded prior caps σ at e^α."""
    if step != faults.damage_step:
        return
    for split in (level.split for level in model.levels):
        if split is not None and split.prior is not None:
            split.prior.bias[split.c_z] = faults.damage_log_std
