"""The metrics sink: metrics.jsonl always, mirrored to MLflow on the main rank.

Other ranks never log: they contribute through all-reduces before ``log`` is called. mlflow is imported
lazily so that model code, data code and a run with tracking disabled never pay for it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from pipeline.track.config import TrackingConfig


def default_uri(run_dir: Path) -> str:
    """A SQLite file under the run folder: no server needed, and `mlflow ui` can open it later."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


class MetricsSink:
    def __init__(
        self,
        run_dir: Path,
        cfg: TrackingConfig,
        is_main: bool,
        run_name: str,
        run_id: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.is_main = is_main
        self.uri = cfg.uri or default_uri(self.run_dir)
        self.run_id = run_id
        self._jsonl = None
        self._mlflow = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if cfg.enabled:
            self._start_mlflow(run_name)

    def _start_mlflow(self, run_name: str) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(self.cfg.experiment)
        # A resumed run continues the same MLflow run rather than starting a new one.
        run = (
            mlflow.start_run(run_id=self.run_id)
            if self.run_id
            else mlflow.start_run(run_name=run_name)
        )
        self.run_id = run.info.run_id
        self._mlflow = mlflow

    def log_params(self, params: dict[str, Any]) -> None:
        if self._mlflow is None:
            return
        existing = self._mlflow.get_run(self.run_id).data.params
        fresh = {k: str(v)[:6000] for k, v in params.items() if k not in existing}
        items = list(fresh.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._mlflow.log_params(dict(items[i : i + 100]))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self._mlflow is not None:
            finite = {k: v for k, v in clean.items() if math.isfinite(v)}
            self._mlflow.log_metrics(finite, step=step)

    def log_event(self, event: dict[str, Any]) -> None:
        """A divergence event: a line of events.jsonl (logged as an artifact at close)."""
        if not self.is_main:
            return
        with open(self.run_dir / "events.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        if self._mlflow is not None:
            self._mlflow.log_artifact(str(path), artifact_path=subdir)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def close(self, status: str = "FINISHED") -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._mlflow is not None:
            self._mlflow.end_run(status=status)
            self._mlflow = None
