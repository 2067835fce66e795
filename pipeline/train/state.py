"""TrainState: everything besides the engine that a resumed run needs to continue exactly."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    samples: int = 0  # images consumed, all ranks together
    epoch: int = 0  # data epoch (each rank's exact stream position is saved beside, per rank)
    mlflow_run_id: str | None = None
    best_val_bpd: float | None = None
