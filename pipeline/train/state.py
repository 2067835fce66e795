"""TrainState: everything besides the engine that a resumed run needs to continue exactly."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    samples: int = 0  # images consumed, all ranks together
    epoch: int = 0  # data epoch (each rank's exact stream position is saved beside, per rank)
    mlflow_run_id: str | None = None
    optimum_bpd: float | None = None  # the pooled linear-flow optimum of the train split (§3.2)
    lr_scale: float = 1.0  # product of the rollback LR cuts so far
    rollbacks: int = 0
    rollback_step: int = -1  # the step of the last rollback target (-1: none yet)
    rolled_back_at: int = -1  # the step at which the last rollback happened (-1: none yet)
    skipped_steps: int = 0
    recent_events: list = field(default_factory=list)  # steps of recent guard events (the window)
    event_counts: dict = field(default_factory=dict)  # kind -> count: the run's one tally
    detector: dict = field(default_factory=dict)  # the divergence detector's history
    failed_checks: int = 0  # checks in a row with an inverse-error or sampler event (the guard)
    suspect: bool = False  # events in the window when saved: not a rollback target
