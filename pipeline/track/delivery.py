"""Delivery of a run folder's journals to one MLflow run, from a background thread.

The training thread only appends to files (metrics.jsonl, tracking/outbox.jsonl); this thread tails
them from the offsets saved in tracking/state.json and sends MlflowClient calls. The files are the
buffer: nothing waits in memory, an unreachable store costs training nothing, and a process that dies
with a backlog leaves it on disk for the next sink on the same folder (a resume) to send.

Guarantees and their limits:
- Order: rows go out in file order, outbox operations (params, tags, artifacts, dataset inputs)
  before the metric rows of the same pass.
- At most once per (metric, step): the state keeps the last step delivered per metric and a row whose
  step is not above it is not sent: steps logged again by a run resumed from a checkpoint older than
  its last log stay in metrics.jsonl only (exact resume makes them equal anyway, timings aside), and
  of two values at one step MLflow keeps the first. Steps therefore increase strictly per metric.
- The one repeat: a batch the store acknowledged just before the process died, before the state
  was saved, is sent again by the next sink (delivery is at least once, not exactly once).
- Retries: every failure that is not the store rejecting the request itself is retried with capped
  exponential backoff (``tracking.retry_max_s``); MLflow's own HTTP retries are switched off so a
  dead server fails in milliseconds instead of stalling the thread for minutes.
- Rejections (an invalid name or value): the metric or operation is skipped with a warning.
- Set-up is retried like any call: opening the store (creating or migrating a SQLite file, one
  process at a time: pipeline/track/store.py), the experiment and the run. Until it succeeds the
  run trains with metrics.jsonl alone; nothing in tracking can stop training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.io import atomic_write_text
from pipeline.track import system
from pipeline.track.config import TrackingConfig
from pipeline.track.journal import count_lines, file_size, open_journal, read_lines
from pipeline.track.lineage import dataset_inputs
from pipeline.track.store import local_artifact_root, open_client

log = logging.getLogger(__name__)

BATCH = 1000  # MLflow's limit on metrics per log_batch call
PARAM_BATCH = 100  # and on params (and tags) per call
PARAM_CHARS = 6000  # longest param value every MLflow version accepts
TAG_CHARS = 5000
LINGER_S = 0.5  # after a wake-up, wait this long for more rows: fewer, larger batches
FIRST_RETRY_S = 0.5
REJECTED = {  # error codes meaning the request itself is wrong: retrying cannot help
    "INVALID_PARAMETER_VALUE",
    "BAD_REQUEST",
    "MALFORMED_REQUEST",
    "INVALID_STATE",
}
MAX_WARNINGS = 5
# MLflow 3 opens an experiment without a kind in its GenAI view (traces, prompts); this one trains
# models, so it carries the kind that opens the model-training view (runs, models, datasets).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


@dataclass
class State:
    """tracking/state.json: which store and run this folder mirrors to, and how far it got."""

    uri: str = ""
    experiment: str = ""
    run_id: str | None = None
    experiment_id: str | None = None  # the run's, for the link to it in the UI
    metrics_offset: int = 0  # bytes of metrics.jsonl delivered
    outbox_offset: int = 0  # bytes of tracking/outbox.jsonl delivered
    last_step: dict[str, int] = field(default_factory=dict)  # per metric, the last step delivered
    undelivered: dict[str, int] = field(default_factory=dict)  # left behind by the last close()

    @classmethod
    def load(cls, path: Path, uri: str, experiment: str) -> State:
        """The saved state for this store, or a fresh one (a new folder, or the store changed)."""
        try:
            tree = json.loads(path.read_text())
            saved = cls(**{k: v for k, v in tree.items() if k in cls.__dataclass_fields__})
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            return cls(uri=uri, experiment=experiment)
        if saved.uri != uri:
            log.warning(
                "tracking store changed from %s to %s: mirroring the whole run folder to the new one",
                saved.uri,
                uri,
            )
            return cls(uri=uri, experiment=experiment)
        return saved

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=1))


def limit_http_retries(cfg: TrackingConfig) -> None:
    """Fail fast on a dead server: this thread retries by itself, without blocking anyone."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.http_timeout_s)


def rejected(error: Exception) -> bool:
    return getattr(error, "error_code", None) in REJECTED


class Delivery:
    def __init__(
        self,
        run_dir: Path,
        uri: str,
        cfg: TrackingConfig,
        run_name: str,
        run_id: str | None,
    ):
        limit_http_retries(cfg)
        self.client: Any = None  # built by ensure_run: building it can fail like any call
        self.uri, self.cfg, self.run_name = uri, cfg, run_name
        self.metrics_path = run_dir / "metrics.jsonl"
        self.dir = run_dir / "tracking"
        self.outbox_path = self.dir / "outbox.jsonl"
        self.state_path = self.dir / "state.json"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = State.load(self.state_path, uri, cfg.experiment)
        if self.state.run_id and run_id and self.state.run_id != run_id:
            log.warning(
                "run folder %s mirrors MLflow run %s (tracking/state.json); ignoring run id %s",
                run_dir,
                self.state.run_id,
                run_id,
            )
        self.run_id = self.state.run_id or run_id
        self.outbox = open_journal(self.outbox_path)
        self.ready = False  # the run exists in the store and is RUNNING
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.warnings = 0
        self.monitor = None
        self.want_monitor = system.wanted(cfg.system_metrics)
        self.status = "FINISHED"
        self.deadline = math.inf
        self.wake = threading.Event()
        self.stopping = threading.Event()
        try:  # a first try here, so that .run_id is known at once whenever the store answers
            self.ensure_run()
            self.start_monitor()
        except Exception as e:
            self.note_failure(e)
        self.thread = threading.Thread(target=self.loop, name="mlflow-delivery", daemon=True)
        self.thread.start()

    # ---- called from the training thread -----------------------------------------------------

    def enqueue(self, op: dict[str, Any]) -> None:
        self.outbox.write(json.dumps(op) + "\n")
        self.wake.set()

    def stop(self, status: str, timeout_s: float) -> int:
        """Deliver what is pending for up to ``timeout_s``, end the run; returns what is left."""
        self.status = status
        self.deadline = time.monotonic() + timeout_s
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout_s + self.cfg.http_timeout_s + 5)
        if self.thread.is_alive():
            log.warning("MLflow delivery still busy after %.0f s; leaving it", timeout_s)
        self.outbox.close()
        return self.pending()

    def pending(self) -> int:
        """Metric rows and outbox operations written but not yet delivered."""
        return count_lines(self.metrics_path, self.state.metrics_offset) + count_lines(
            self.outbox_path, self.state.outbox_offset
        )

    def caught_up(self) -> bool:
        return (
            self.ready
            and self.state.metrics_offset >= file_size(self.metrics_path)
            and self.state.outbox_offset >= file_size(self.outbox_path)
        )

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.caught_up():
            if time.monotonic() > deadline or not self.thread.is_alive():
                return False
            self.wake.set()
            time.sleep(0.05)
        return True

    # ---- the delivery thread -------------------------------------------------------------------

    def loop(self) -> None:
        backoff = FIRST_RETRY_S
        while True:
            try:
                self.ensure_run()
                self.deliver_outbox()
                self.deliver_metrics()
            except Exception as e:
                self.note_failure(e)
                if self.stopping.is_set():
                    left = self.deadline - time.monotonic()
                    if left <= 0:
                        break
                    time.sleep(min(backoff, left))
                else:
                    self.stopping.wait(backoff)
                backoff = min(2 * backoff, self.cfg.retry_max_s)
                continue
            if self.failing_since is not None:
                self.note_recovery()
            backoff = FIRST_RETRY_S
            if self.stopping.is_set():
                if self.caught_up() or time.monotonic() > self.deadline:
                    break
                time.sleep(0.05)  # e.g. a line still being written: look again shortly
                continue
            self.wake.wait()
            self.wake.clear()
            self.stopping.wait(LINGER_S)
        self.finish()

    def ensure_run(self) -> None:
        """Resume the saved run (RUNNING again) or create one; its id is saved before anything else.

        Every step of it, opening the store included, may fail: the loop retries it, and until it
        succeeds training goes on with metrics.jsonl alone."""
        if self.ready:
            return
        from mlflow.exceptions import MlflowException

        if self.client is None:
            self.client = open_client(self.uri)

        if self.run_id:
            try:
                run = self.client.get_run(self.run_id)
                gone = run.info.lifecycle_stage == "deleted"
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                gone = True
            if gone:
                log.warning("MLflow run %s is not in %s: starting a new run", self.run_id, self.uri)
                self.run_id = None
                self.state = State(uri=self.uri, experiment=self.cfg.experiment)
            else:
                if run.info.status != "RUNNING":
                    self.client.update_run(self.run_id, status="RUNNING")
                self.client.set_tag(self.run_id, "node", system.node_id())
                if self.state.run_id is None:  # adopted without a state: see what it already has
                    self.state.last_step = self.delivered_steps()
        if not self.run_id:
            run = self.client.create_run(
                self.experiment_id(), run_name=self.run_name, tags={"node": system.node_id()}
            )
            self.run_id = run.info.run_id
        self.state.run_id, self.state.experiment_id = self.run_id, run.info.experiment_id
        self.state.save(self.state_path)
        self.ready = True

    def experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.cfg.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(
                    name, artifact_location=local_artifact_root(self.uri), tags=EXPERIMENT_KIND
                )
            except MlflowException as e:  # another run created it meanwhile
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(name)
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        for key, value in EXPERIMENT_KIND.items():  # an experiment made before, or by others
            if key not in exp.tags:  # a kind someone chose stays
                self.client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

    def delivered_steps(self) -> dict[str, int]:
        """Last step per metric already in the run, so an adopted run gets no step twice."""
        run = self.client.get_run(self.run_id)
        return {
            key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
            for key in run.data.metrics
            if not key.startswith("system/")
        }

    def deliver_outbox(self) -> None:
        while rows := read_lines(self.outbox_path, self.state.outbox_offset):
            for offset, op in rows:
                if op is not None:
                    self.apply(op)
                self.state.outbox_offset = offset
                self.state.save(self.state_path)

    def apply(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        kind = op.get("op")
        try:
            if kind == "params":
                existing = self.client.get_run(self.run_id).data.params
                changed = [k for k, v in op["params"].items() if k in existing and existing[k] != v]
                if changed:
                    self.warn(f"params already set with other values, kept as they were: {changed}")
                fresh = [Param(k, v) for k, v in op["params"].items() if k not in existing]
                for i in range(0, len(fresh), PARAM_BATCH):
                    self.client.log_batch(
                        self.run_id, params=fresh[i : i + PARAM_BATCH], synchronous=True
                    )
            elif kind == "tags":
                tags = [RunTag(k, v) for k, v in op["tags"].items()]
                for i in range(0, len(tags), PARAM_BATCH):
                    self.client.log_batch(
                        self.run_id, tags=tags[i : i + PARAM_BATCH], synchronous=True
                    )
            elif kind == "artifact":
                self.upload(op)
            elif kind == "inputs":  # MLflow keeps one input per run and dataset: resends are no-ops
                self.client.log_inputs(self.run_id, datasets=dataset_inputs(op["datasets"]))
            else:
                self.warn(f"unknown outbox operation skipped: {op}")
        except Exception as e:
            if not rejected(e):
                raise
            self.warn(f"MLflow rejected {kind}: {e}")

    def upload(self, op: dict[str, Any]) -> None:
        snapshot = self.dir / op["file"]
        if not snapshot.exists():
            self.warn(f"artifact snapshot {snapshot} is gone; not uploaded")
            return
        if snapshot.is_dir():
            where = "/".join(p for p in (op.get("subdir"), snapshot.name) if p)
            self.client.log_artifacts(self.run_id, str(snapshot), artifact_path=where)
        else:
            self.client.log_artifact(self.run_id, str(snapshot), artifact_path=op.get("subdir"))
        shutil.rmtree(snapshot.parent, ignore_errors=True)

    def deliver_metrics(self) -> None:
        if self.state.metrics_offset > file_size(self.metrics_path):
            log.warning(
                "%s is shorter than what was delivered: reading it again", self.metrics_path
            )
            self.state.metrics_offset = 0  # the per-metric step filter keeps out what MLflow has
        while rows := read_lines(self.metrics_path, self.state.metrics_offset):
            batch: list = []
            seen = dict(self.state.last_step)  # as of the end of `batch`
            done = self.state.metrics_offset
            for offset, row in rows:
                fresh = self.fresh_metrics(row, seen)
                if batch and len(batch) + len(fresh) > BATCH:  # batches end at row boundaries
                    self.send(batch)
                    self.commit_metrics(done, seen)
                    batch = []
                batch += fresh
                seen.update((m.key, m.step) for m in fresh)
                done = offset
            self.send(batch)
            self.commit_metrics(done, seen)

    @staticmethod
    def fresh_metrics(row: dict | None, seen: dict[str, int]) -> list:
        """The row's finite values at a step above the last one delivered for that metric."""
        from mlflow.entities import Metric

        if not isinstance(row, dict) or "step" not in row:
            return []
        step, ms = int(row["step"]), int(float(row.get("time", time.time())) * 1000)
        return [
            Metric(key, float(value), ms, step)
            for key, value in row.items()
            if key not in ("step", "time")
            and isinstance(value, int | float)
            and math.isfinite(value)
            and step > seen.get(key, -1)
        ]

    def send(self, batch: list) -> None:
        for i in range(0, len(batch), BATCH):
            chunk = batch[i : i + BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            except Exception as e:
                if not rejected(e):
                    raise
                self.send_one_by_one(chunk)

    def send_one_by_one(self, chunk: list) -> None:
        """Find the metric the store refuses, skip it, keep the rest."""
        for metric in chunk:
            try:
                self.client.log_batch(self.run_id, metrics=[metric], synchronous=True)
            except Exception as e:
                if not rejected(e):
                    raise
                self.warn(
                    f"MLflow rejected metric {metric.key}={metric.value} at {metric.step}: {e}"
                )

    def commit_metrics(self, offset: int, seen: dict[str, int]) -> None:
        self.state.metrics_offset = offset
        self.state.last_step = dict(seen)
        self.state.save(self.state_path)

    def start_monitor(self) -> None:
        if self.monitor is None and self.want_monitor:
            self.monitor = system.start_monitor(
                self.uri, self.run_id, self.cfg.system_metrics_interval_s
            )
            self.want_monitor = self.monitor is not None  # it said why once; no retry per pass

    def stop_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None

    def note_failure(self, error: Exception) -> None:
        self.last_error = f"{type(error).__name__}: {error}"
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning(
                "MLflow store %s unreachable (%s); training goes on, metrics wait in metrics.jsonl",
                self.uri,
                str(error)[:300],
            )

    def note_recovery(self) -> None:
        log.warning(
            "MLflow store %s reachable again after %.0f s; backlog delivered",
            self.uri,
            time.monotonic() - self.failing_since,
        )
        self.failing_since = None
        # MLflow's monitor ends itself when the store is unreachable: replace it.
        self.stop_monitor()
        self.start_monitor()

    def warn(self, message: str) -> None:
        self.warnings += 1
        if self.warnings <= MAX_WARNINGS:
            log.warning(message)

    def finish(self) -> None:
        """End the run when everything arrived; otherwise record what is left for the next sink."""
        self.stop_monitor()
        left = {
            "metric_rows": count_lines(self.metrics_path, self.state.metrics_offset),
            "outbox_ops": count_lines(self.outbox_path, self.state.outbox_offset),
        }
        if self.ready and not any(left.values()):
            try:
                self.client.set_terminated(self.run_id, status=self.status)
            except Exception as e:
                log.warning("could not end MLflow run %s: %s", self.run_id, e)
        else:
            log.warning(
                "MLflow store %s unreachable at close (%s): %d metric rows and %d params/tags/"
                "artifacts not delivered; they stay in the run folder and the next sink on it "
                "(a resume) sends them",
                self.uri,
                (self.last_error or "")[:200],
                left["metric_rows"],
                left["outbox_ops"],
            )
        self.state.undelivered = left
        self.state.save(self.state_path)
