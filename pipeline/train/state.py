"""TrainState: everything besides the engine that a resumed run needs to continue exactly."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    samples: int = 0  # images consumed, all ranks together
    data: dict = field(default_factory=dict)  # the train loader's position (same on every rank)
    mlflow_run_id: str | None = None
    best_val_bpd: float | None = None
