"""The guard section of the config tree: the divergence detector's thresholds (pipeline/theory) and
the guard's policy (pipeline/train/guard.py), in one place.

Mounted as ``cfg.guard``; every field is a plain scalar, so ``guard.x=v`` overrides work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.ranges import NON_NEGATIVE, OPEN_UNIT, POSITIVE, Range, at_least


@dataclass
class GuardConfig:
    window: int = 100  # recent finite values; their median absolute step is the noise scale
    level_window: int = 10  # recent values whose median is the current level
    min_history: int = 20  # no spike verdict before this many values are known
    loss_spike_z: float = 6.0  # loss above level + z·scale is a spike (one-sided)
    loss_spike_floor: float = 1e-3  # smallest robust loss scale, relative to |level| (flat curves)
    grad_spike_z: float = 8.0  # the same on log(grad norm): norms are heavy-tailed and positive
    grad_spike_floor: float = 0.25  # smallest robust scale of log(grad norm): z·0.25 = ×7.4 at z=8
    logdet_slack: float = 1e-4  # nats/dim of float error allowed outside the certified range
    inverse_tol: float = 1e-3  # max |f⁻¹(f(x)) - x| on data in [-1/2, 1/2) (bins are 2^-n wide)
    # the same for diagnostics taken under bf16 autocast, whose rounding alone reaches ~1e-2 on
    # trained models (fp32: ~1e-6); the sampler check runs in float32 and keeps inverse_tol
    inverse_tol_bf16: float = 1e-1
    # log|det J|/D extremes of the batch beyond level ± z·scale of their own recent history (robust,
    # as the loss spike) -> logdet_jump; the floor is in nats/dim
    logdet_jump_z: float = 8.0
    logdet_jump_floor: float = 0.02
    diagnostics_every: int = 50  # steps between flow diagnostics (Lipschitz, inverse); 0 = never
    diagnostics_images: int = 4  # images per diagnostics batch (cost ∝ power_iters × images)
    power_iters: int = 10  # power-iteration steps per Lipschitz estimate
    # The exploding-inverse battery (theory/battery.py) at the end of a finished run: images per
    # input family (samples per temperature: twice as many); 0 = skip
    battery_images: int = 16
    # The sampler check (theory/battery.sampler_check) before every checkpoint and at every
    # diagnostics step: fixed val images (and as many samples at T = 1); 0 = off
    check_images: int = 4

    RANGES: ClassVar[dict[str, Range]] = {
        "window": at_least(2),
        "level_window": at_least(1),
        "min_history": at_least(1),
        "loss_spike_z": POSITIVE,
        "loss_spike_floor": NON_NEGATIVE,
        "grad_spike_z": POSITIVE,
        "grad_spike_floor": NON_NEGATIVE,
        "logdet_slack": NON_NEGATIVE,
        "inverse_tol": POSITIVE,
        "inverse_tol_bf16": POSITIVE,
        "logdet_jump_z": POSITIVE,
        "logdet_jump_floor": NON_NEGATIVE,
        "diagnostics_every": NON_NEGATIVE,
        "diagnostics_images": at_least(1),
        "power_iters": at_least(1),
        "rollback_events": at_least(1),
        "rollback_window": at_least(1),
        "rollback_lr_factor": OPEN_UNIT,
        "max_rollbacks": NON_NEGATIVE,
        "battery_images": NON_NEGATIVE,
        "check_images": NON_NEGATIVE,
        "diagnostic_events": at_least(1),
    }
    # Policy: what the guard does with the detector's events (pipeline/train/guard.py)
    rollback_events: int = 3  # this many event steps within `rollback_window` steps -> roll back
    rollback_window: int = 50
    rollback_lr_factor: float = 0.5  # LR multiplier applied at each rollback
    max_rollbacks: int = 3  # one more rollback than this stops the run (status "diverged")
    # inverse-error or sampler events at this many checks in a row (diagnostics or checkpoint
    # steps) -> roll back, however few step events there were
    diagnostic_events: int = 2
    # a finished run whose final battery has non-finite samples or bpd ends "finished_damaged"
    # with exit code 4; true: exit 0 all the same (the status stays)
    allow_damaged: bool = False
