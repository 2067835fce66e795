"""Where a run is in the MLflow UI: the command that serves a store, and the link to the run.

MLflow 3's UI opens its landing page and a bare ``#/experiments/<id>`` on the GenAI overview
(traces, token usage), even for an experiment tagged for model training. The query
``workflowType=machine_learning`` asks for the model-training view: the run with its datasets and
model, or the experiment's runs list. Routes as in MLflow 3.17's UI bundle (a hash router):
``/experiments/:experimentId/runs/:runUuid`` and ``/experiments/:experimentId/runs``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HOST, PORT = "127.0.0.1", 5000  # `mlflow ui`'s default host; the port the printed command names
SERVERS = ("http://", "https://")  # a tracking server serves its own UI


def mlflow_command() -> str:
    """The mlflow executable of this environment (e.g. .venv/bin/mlflow), else plain `mlflow`."""
    candidate = Path(sys.executable).parent / "mlflow"
    return str(candidate) if candidate.is_file() else "mlflow"


def ui_command(uri: str) -> str | None:
    """The command that serves the store ``uri`` at ``ui_link``'s address; None for a server."""
    if uri.startswith(SERVERS):
        return None
    return f"{mlflow_command()} ui --backend-store-uri {uri} --port {PORT}"


def ui_link(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The page of run ``run_id`` (no run: the experiment's runs) in the model-training view, on
    the tracking server ``uri`` or where ``ui_command`` serves a local store."""
    base = uri.rstrip("/") if uri.startswith(SERVERS) else f"http://{HOST}:{PORT}"
    page = f"/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base}/#{page}?workflowType=machine_learning"
