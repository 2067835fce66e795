"""The metrics sink: metrics.jsonl always, mirrored to MLflow from the main rank.

Other ranks never log: they contribute through all-reduces before ``log`` is called, and every method
is a no-op on them. mlflow is imported lazily so that model code, data code and a run with tracking
disabled never pay for it.

What the main rank writes in the run folder:

    metrics.jsonl          one row per ``log``: {"step", "time", name: value, ...}; the full record
    events.jsonl           one row per ``log_event``; also an MLflow artifact
    summary.json           ``log_summary``'s dict; also an MLflow artifact
    tracking/state.json    which store and run the folder mirrors to, and how far delivery got
    tracking/outbox.jsonl  params, tags, artifacts and dataset inputs in the order they were logged
    tracking/outbox/       artifact copies taken at call time, deleted once uploaded

Every call returns after a local file append; a background thread delivers to MLflow and keeps
retrying while the store is unreachable (pipeline/track/delivery.py). One run folder is one MLflow
run: the run id is saved in tracking/state.json as soon as the run exists and wins over the
``run_id`` argument (which comes from a checkpoint, and is None when the store was down until after
the last save). A new sink on the folder, e.g. a resumed run, sends what an earlier one left behind;
``MetricsSink(run_dir, cfg, True, name).close()`` does only that.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.io import atomic_write_text, json_safe
from pipeline.track import system
from pipeline.track.config import TrackingConfig
from pipeline.track.journal import open_journal
from pipeline.track.lineage import run_datasets

EVENT_KIND = re.compile(r"[A-Za-z0-9_.\-]+")  # becomes part of a metric name and a tag key


def default_uri(run_dir: Path) -> str:
    """A SQLite file in the run root (the run folder's parent), shared by the runs there: no server
    needed, `python -m pipeline compare` and `mlflow ui` see them all."""
    return f"sqlite:///{(Path(run_dir).resolve().parent / 'mlflow.db')}"


class MetricsSink:
    def __init__(
        self,
        run_dir: Path,
        cfg: TrackingConfig,
        is_main: bool,
        run_name: str,
        run_id: str | None = None,
        shards: Path | None = None,
        params: dict[str, Any] | None = None,
        monitor_node: bool = False,
    ):
        """``shards``: the run's shard folder, whose splits become the run's dataset inputs
        (lineage.py; MLflow keeps one per run and dataset, so a resume adds none); ``params``: the
        run's parameters. ``monitor_node`` (a rank other than the main one, local rank 0 of its
        node): MLflow system metrics of this node into the run ``run_id``, if the store is shared
        (a tracking server: another node cannot reach the main node's SQLite file)."""
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.is_main = is_main
        self.uri = cfg.uri or default_uri(self.run_dir)
        self.undelivered = 0  # rows and operations close() had to leave for a later sink
        self._run_id = run_id
        self._experiment_id: str | None = None
        self._jsonl = None
        self._delivery = None
        self._artifacts = 0
        self.node_monitor = None
        if not is_main:
            shared = not self.uri.startswith(("sqlite:", "file:")) and "://" in self.uri
            if monitor_node and run_id and shared and system.wanted(cfg.system_metrics):
                self.node_monitor = system.start_monitor(
                    self.uri, run_id, cfg.system_metrics_interval_s
                )
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open_journal(self.run_dir / "metrics.jsonl")
        if cfg.enabled:
            from pipeline.track.delivery import Delivery

            self._delivery = Delivery(self.run_dir, self.uri, cfg, run_name, run_id)
            if shards is not None:
                self.log_inputs(run_datasets(shards))
            if params:
                self.log_params(params)

    @property
    def run_id(self) -> str | None:
        """The MLflow run; None while a store that was down at start has not come back."""
        return self._delivery.run_id if self._delivery is not None else self._run_id

    @property
    def experiment_id(self) -> str | None:
        """The MLflow run's experiment (for the link to the run in the UI); None like run_id."""
        delivery = self._delivery
        return delivery.state.experiment_id if delivery is not None else self._experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Params already in the run keep their value (MLflow forbids changing one)."""
        from pipeline.track.delivery import PARAM_CHARS

        if self._delivery is not None:
            fresh = {str(k): str(v)[:PARAM_CHARS] for k, v in params.items()}
            self._delivery.enqueue({"op": "params", "params": fresh})

    def log_inputs(self, datasets: list[dict[str, str]]) -> None:
        """Dataset inputs of the run (pipeline/track/lineage.py: the shard set's splits)."""
        if self._delivery is not None and datasets:
            self._delivery.enqueue({"op": "inputs", "datasets": datasets})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._jsonl is None:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        if self._delivery is not None:
            self._delivery.wake.set()

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        """Upload a file (or folder) as it is now: a copy waits in tracking/outbox until sent."""
        if self._delivery is None:
            return
        path = Path(path)
        self._artifacts += 1
        slot = f"outbox/{time.time_ns()}-{self._artifacts}"
        copy = self._delivery.dir / slot / path.name
        copy.parent.mkdir(parents=True)
        if path.is_dir():
            shutil.copytree(path, copy)
        else:
            shutil.copy2(path, copy)
        self._delivery.enqueue({"op": "artifact", "file": f"{slot}/{path.name}", "subdir": subdir})

    def set_tags(self, tags: dict[str, Any]) -> None:
        from pipeline.track.delivery import TAG_CHARS

        if self._delivery is not None:
            fresh = {str(k): str(v)[:TAG_CHARS] for k, v in tags.items()}
            self._delivery.enqueue({"op": "tags", "tags": fresh})

    def log_event(self, event: dict[str, Any], counts: dict[str, int]) -> None:
        """Record an event: one row of events.jsonl (with the time and its kind's count), the
        metric ``events/<kind>`` (the count, at the event's step), the tags ``events.<kind>``,
        ``events.total`` and ``events.last``, and the events.jsonl artifact.

        ``event`` needs "kind" and "step" (e.g. ``detector.Event.to_dict()``); ``counts`` is the
        run's tally after it (kind -> count, the TrainState's: checkpointed, so a resumed run that
        meets again the events logged after its checkpoint counts them once). The sink writes
        counts and never keeps one of its own.
        """
        kind, step = str(event["kind"]), int(event["step"])
        if not EVENT_KIND.fullmatch(kind):
            raise ValueError(f"event kind {kind!r} must match {EVENT_KIND.pattern}")
        if not self.is_main:
            return
        count = int(counts[kind])
        path = self.run_dir / "events.jsonl"
        row = {**json_safe(event), "kind": kind, "step": step, "time": time.time(), "count": count}
        with open_journal(path) as f:
            f.write(json.dumps(row) + "\n")
        self.log(step, {f"events/{kind}": count})
        self.set_tags(
            {
                f"events.{kind}": count,
                "events.total": sum(counts.values()),
                "events.last": f"{kind} at step {step}",
            }
        )
        self.log_artifact(path)

    def log_summary(self, summary: dict[str, Any]) -> Path | None:
        """Write summary.json in the run folder, upload it, and tag the run with its scalars."""
        if not self.is_main:
            return None
        path = write_summary(self.run_dir, summary)
        self.log_artifact(path)
        scalars = {
            f"summary.{k}": v
            for k, v in json_safe(summary).items()
            if isinstance(v, bool | int | float | str)
        }
        self.set_tags(scalars)
        return path

    def pending(self) -> int:
        """Metric rows and params/tags/artifacts not yet in MLflow."""
        return self._delivery.pending() if self._delivery is not None else 0

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for MLflow to have everything; True when it does."""
        return self._delivery is None or self._delivery.wait_idle(timeout_s)

    def close(self, status: str = "FINISHED") -> None:
        """Flush for up to ``tracking.flush_timeout_s``, then end the run with ``status``
        (FINISHED, FAILED, KILLED). What cannot be sent stays on disk for the next sink."""
        if self.node_monitor is not None:
            self.node_monitor.finish()
            self.node_monitor = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._delivery is not None:
            self._run_id = self._delivery.run_id
            self.undelivered = self._delivery.stop(status, self.cfg.flush_timeout_s)
            self._run_id = self._delivery.run_id
            self._experiment_id = self._delivery.state.experiment_id
            self._delivery = None


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """<run_dir>/summary.json as strict JSON, atomically (also where no sink could be built)."""
    path = Path(run_dir) / "summary.json"
    atomic_write_text(path, json.dumps(json_safe(summary), indent=1) + "\n")
    return path
