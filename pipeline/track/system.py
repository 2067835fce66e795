"""MLflow system metrics (CPU, memory, disk, network; GPU when pynvml is installed), one monitor per node.

The main rank's sink starts one for its node. On a multi-node run, local rank 0 of every other node
may start its own with ``start_monitor(uri, run_id, interval_s)`` once the main rank has broadcast the
run id; that needs a store every node can reach (a tracking server; a node-local SQLite file is not).
Metric names carry the node: ``system/<node>/cpu_utilization_percentage``, the node being its
hostname or ``$LIPFLOW_NODE_NAME``.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

log = logging.getLogger(__name__)


def node_id() -> str:
    """The node's name in metric names: ``$LIPFLOW_NODE_NAME``, else the hostname (set it where
    nodes share a hostname, e.g. containers that all call themselves ``localhost``)."""
    return os.environ.get("LIPFLOW_NODE_NAME") or socket.gethostname()


def wanted(system_metrics: bool) -> bool:
    """The config switch, and MLflow's own environment switch when it explicitly says no."""
    env = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower()
    return system_metrics and env not in ("false", "0", "no")


def start_monitor(uri: str, run_id: str, interval_s: float, node: str | None = None) -> Any:
    """Start MLflow's SystemMetricsMonitor on ``run_id``; None (with a warning) when it cannot run.

    Its steps continue from the run's last system-metrics step, so a resumed run extends the curves.
    The monitor stops by itself when it cannot reach the store; the sink starts a new one when the
    store is back.
    """
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=interval_s,
            resume_logging=True,
            node_id=node or node_id(),
            tracking_uri=uri,
        )
    except Exception as e:  # psutil missing, or the store unreachable for the resume look-up
        log.warning("MLflow system metrics not started: %s", e)
        return None
    monitor.start()
    return monitor
