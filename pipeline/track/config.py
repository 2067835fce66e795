"""The tracking section of the config tree (owned by pipeline/track)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrackingConfig:
    uri: str = ""  # any MLflow tracking URI; empty = SQLite file <run dir>/mlflow.db
    experiment: str = "lipflow"
    enabled: bool = True
