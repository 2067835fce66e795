"""The tracking section of the config tree (owned by pipeline/track)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.ranges import NON_NEGATIVE, POSITIVE, Range, at_least


@dataclass
class TrackingConfig:
    uri: str = (
        ""  # any MLflow tracking URI; empty = SQLite file <run.root>/mlflow.db, shared by runs
    )
    experiment: str = "lipflow"
    enabled: bool = True  # false: metrics.jsonl only, mlflow is never imported
    # MLflow's CPU/memory/disk/network (and GPU with pynvml) monitor, metrics system/<host>/...;
    # MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false, MLflow's own switch, also turns it off.
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0
    # Delivery to MLflow runs in a background thread that tails metrics.jsonl, so an unreachable
    # store never blocks training; these bound how it waits.
    retry_max_s: float = 30.0  # longest pause between attempts while the store is unreachable
    flush_timeout_s: float = 60.0  # close() waits this long for the backlog, then leaves it on disk
    http_timeout_s: int = 10  # per request; MLflow's default (120 s, 7 retries) stalls for minutes
    # The final weights of a finished run as the MLflow model runs:/<run_id>/model (a pyfunc:
    # images -> per-image bpd; pipeline/track/model.py); register_model: also a new version of
    # this registered model. A failure is a warning and a reason in summary.json, never fatal.
    log_model: bool = True
    register_model: str = ""

    RANGES: ClassVar[dict[str, Range]] = {
        "system_metrics_interval_s": POSITIVE,
        "retry_max_s": POSITIVE,
        "flush_timeout_s": NON_NEGATIVE,
        "http_timeout_s": at_least(1),
    }
