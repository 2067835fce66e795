"""The metrics sink against a real SQLite MLflow store: what arrives, resume, rank and switch handling."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import math
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.track.config import TrackingConfig
from pipeline.track.sink import MetricsSink
from tests.conftest import PYTHON, ROOT, env_for_subprocess


@functools.cache
def _template_db() -> Path:
    """An initialised MLflow SQLite store, made once per session: creating one runs MLflow's
    migrations (~5-10 s here), copying one is instant."""
    from mlflow.tracking import MlflowClient

    folder = tempfile.mkdtemp(prefix="lipflow-mlflow-template-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = Path(folder) / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def sqlite_store(run_root: Path) -> str:
    """A fresh store at <run_root>/mlflow.db: where the sink looks when tracking.uri is empty."""
    run_root.mkdir(parents=True, exist_ok=True)
    shutil.copy(_template_db(), run_root / "mlflow.db")
    return f"sqlite:///{(run_root / 'mlflow.db').resolve()}"


def tracking(**changes) -> TrackingConfig:
    """Test defaults: no system metrics (turned on only where tested), quick retries."""
    return dataclasses.replace(
        TrackingConfig(experiment="test", system_metrics=False, retry_max_s=1.0), **changes
    )


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    points = MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in points)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_default_sqlite_store_gets_params_metrics_events_artifacts_and_summary(
    tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # an artifact store relative to the cwd would show up here
    root = tmp_path / "runs"
    uri = sqlite_store(root)
    sink = MetricsSink(root / "a", tracking(), is_main=True, run_name="a")
    assert sink.uri == uri and sink.run_id  # the default store, and the run exists at once
    sink.log_params({"train.lr": 1e-3, "model.width": 16, "run.world_size": 1})
    for step in range(1, 6):
        loss = float("nan") if step == 4 else 5.0 - step / 10
        sink.log(step, {"train/bpd": loss, "optim/lr": 1e-3 * step})
    # the caller's tally after each event (the run's TrainState.event_counts)
    counts = {"loss_spike": 1}
    sink.log_event(
        {"kind": "loss_spike", "step": 3, "value": 9.0, "threshold": 6.0, "rank": 0}, counts
    )
    counts["non_finite_loss"] = 1
    sink.log_event({"kind": "non_finite_loss", "step": 4, "value": math.nan, "rank": 0}, counts)
    counts["loss_spike"] = 2
    sink.log_event(
        {"kind": "loss_spike", "step": 5, "value": 8.0, "threshold": 6.0, "rank": 0}, counts
    )
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"not really a png")
    sink.log_artifact(grid, "samples")
    grid.write_bytes(b"overwritten after the call")  # the upload must be the file as it was
    sink.set_tags({"guard.policy": "rollback"})
    sink.log_summary({"final_val_bpd": 4.5, "steps": 5, "best": float("inf")})
    with pytest.raises(ValueError, match="event kind"):
        sink.log_event({"kind": "bad kind!", "step": 5}, {"bad kind!": 1})
    sink.close()
    assert sink.undelivered == 0

    client = MlflowClient(uri)
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "a"
    assert run.data.params == {"train.lr": "0.001", "model.width": "16", "run.world_size": "1"}
    # A non-finite value stays in metrics.jsonl only: MLflow gets the finite steps.
    assert history(uri, sink.run_id, "train/bpd") == [(1, 4.9), (2, 4.8), (3, 4.7), (5, 4.5)]
    assert [s for s, _ in history(uri, sink.run_id, "optim/lr")] == [1, 2, 3, 4, 5]
    assert history(uri, sink.run_id, "events/loss_spike") == [(3, 1.0), (5, 2.0)]
    assert history(uri, sink.run_id, "events/non_finite_loss") == [(4, 1.0)]
    tags = run.data.tags
    assert tags["events.loss_spike"] == "2" and tags["events.non_finite_loss"] == "1"
    assert tags["events.total"] == "3" and tags["events.last"] == "loss_spike at step 5"
    assert tags["guard.policy"] == "rollback" and tags["summary.final_val_bpd"] == "4.5"
    assert tags["summary.best"] == "inf" and tags["node"] == socket.gethostname()

    files = {a.path for a in client.list_artifacts(sink.run_id)}
    assert files == {"events.jsonl", "summary.json", "samples"}
    local = Path(client.download_artifacts(sink.run_id, "", str(tmp_path / "dl")))
    assert (local / "samples" / "grid.png").read_bytes() == b"not really a png"
    events = jsonl(local / "events.jsonl")
    assert [(e["kind"], e["step"], e["count"]) for e in events] == [
        ("loss_spike", 3, 1),
        ("non_finite_loss", 4, 1),
        ("loss_spike", 5, 2),
    ]
    assert events[1]["value"] == "nan"  # strict JSON in the artifact
    assert json.loads((local / "summary.json").read_text())["best"] == "inf"
    assert run.info.artifact_uri.startswith((root / "mlartifacts").resolve().as_uri())
    assert not (tmp_path / "mlruns").exists()
    assert not list((root / "a" / "tracking" / "outbox").iterdir())  # copies gone once uploaded

    rows = jsonl(root / "a" / "metrics.jsonl")  # the full record, the NaN included
    assert [r["step"] for r in rows if "train/bpd" in r] == [1, 2, 3, 4, 5]
    assert math.isnan(rows[3]["train/bpd"])
    state = json.loads((root / "a" / "tracking" / "state.json").read_text())
    assert state["run_id"] == sink.run_id and state["undelivered"] == {
        "metric_rows": 0,
        "outbox_ops": 0,
    }


def test_a_campaign_of_restarts_is_one_run_with_every_step_once(tmp_path):
    """Four processes' worth of sinks on one run folder, each resuming from a checkpoint older than
    its predecessor's last log (so steps are re-logged): one run, steps 1..N once each, the first
    value of a re-logged step kept, event counts continued."""
    from mlflow.tracking import MlflowClient

    root = tmp_path / "runs"
    uri = sqlite_store(root)
    cfg = tracking()
    run_dir = root / "campaign"
    value = lambda attempt, step: 10.0 * attempt + step  # noqa: E731 (which attempt logged it)

    sink = MetricsSink(run_dir, cfg, True, "campaign")
    run_id = sink.run_id
    sink.log_params({"train.steps": 40})
    for step in range(1, 11):
        sink.log(step, {"train/bpd": value(0, step)})
    sink.log_event({"kind": "loss_spike", "step": 7}, {"loss_spike": 1})
    sink.close("KILLED")  # e.g. preempted; its last checkpoint was at step 8
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"

    resumes = [(8, 20), (18, 30), (25, 40)]  # (checkpoint step, last step of that attempt)
    for attempt, (ckpt, last) in enumerate(resumes, start=1):
        # The third restart passes no run id, like a checkpoint saved while the store was down:
        # the run folder's tracking/state.json still names the run.
        given = None if attempt == 3 else run_id
        sink = MetricsSink(run_dir, cfg, True, "campaign", run_id=given)
        assert sink.run_id == run_id
        assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
        for step in range(ckpt + 1, last + 1):
            sink.log(step, {"train/bpd": value(attempt, step)})
        if attempt == 2:
            sink.log_event({"kind": "loss_spike", "step": 27}, {"loss_spike": 2})
        sink.close()

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED" and runs[0].data.params == {"train.steps": "40"}
    points = history(uri, run_id, "train/bpd")
    assert [s for s, _ in points] == list(range(1, 41))
    first_attempt = {}
    for attempt, (start, last) in enumerate([(0, 10), *resumes]):
        for step in range(start + 1, last + 1):
            first_attempt.setdefault(step, attempt)
    assert points == [(s, value(first_attempt[s], s)) for s in range(1, 41)]
    assert history(uri, run_id, "events/loss_spike") == [(7, 1.0), (27, 2.0)]
    # metrics.jsonl keeps every row, re-logged ones included.
    rows = jsonl(run_dir / "metrics.jsonl")
    assert len([r for r in rows if "train/bpd" in r]) == 10 + 12 + 12 + 15


def test_a_changed_store_gets_the_whole_run_folder(tmp_path):
    """Switching tracking.uri on resume mirrors everything to a new run in the new store."""
    first_uri = sqlite_store(tmp_path / "one")
    second_uri = sqlite_store(tmp_path / "two")
    run_dir = tmp_path / "runs" / "moved"
    sink = MetricsSink(run_dir, tracking(uri=first_uri), True, "moved")
    for step in range(1, 4):
        sink.log(step, {"train/bpd": float(step)})
    sink.close()
    old_id = sink.run_id

    sink = MetricsSink(run_dir, tracking(uri=second_uri), True, "moved", run_id=old_id)
    sink.log(4, {"train/bpd": 4.0})
    sink.close()
    assert sink.run_id != old_id
    assert history(second_uri, sink.run_id, "train/bpd") == [(s, float(s)) for s in range(1, 5)]
    assert history(first_uri, old_id, "train/bpd") == [(s, float(s)) for s in range(1, 4)]


def test_a_torn_last_line_costs_only_that_line(tmp_path):
    """A process killed mid-write leaves half a row; the next sink closes it off and moves on."""
    uri = sqlite_store(tmp_path / "runs")
    run_dir = tmp_path / "runs" / "torn"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(
        '{"step": 1, "time": 1.0, "train/bpd": 3.0}\n{"step": 2, "time": 2.0, "train/b'
    )
    sink = MetricsSink(run_dir, tracking(), True, "torn")
    sink.log(3, {"train/bpd": 2.0})
    sink.close()
    assert history(uri, sink.run_id, "train/bpd") == [(1, 3.0), (3, 2.0)]


def test_system_metrics_carry_the_node_name(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    from mlflow.tracking import MlflowClient

    uri = sqlite_store(tmp_path / "runs")
    cfg = tracking(system_metrics=True, system_metrics_interval_s=0.2)
    sink = MetricsSink(tmp_path / "runs" / "sys", cfg, True, "sys")
    for step in range(1, 11):
        sink.log(step, {"train/bpd": 1.0})
        time.sleep(0.1)
    sink.close()
    metrics = MlflowClient(uri).get_run(sink.run_id).data.metrics
    node = socket.gethostname()
    assert f"system/{node}/cpu_utilization_percentage" in metrics
    assert f"system/{node}/system_memory_usage_megabytes" in metrics

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")  # MLflow's own off switch
    sink = MetricsSink(tmp_path / "runs" / "quiet", cfg, True, "quiet")
    sink.log(1, {"train/bpd": 1.0})
    time.sleep(0.5)
    sink.close()
    assert set(MlflowClient(uri).get_run(sink.run_id).data.metrics) == {"train/bpd"}


def test_other_ranks_and_disabled_tracking_touch_no_store(tmp_path):
    """Run in a fresh interpreter: it also shows mlflow is never imported on those paths."""
    script = f"""
import sys
from pathlib import Path
from pipeline.track.config import TrackingConfig
from pipeline.track.sink import MetricsSink

root = Path({str(tmp_path)!r})
other = MetricsSink(root / "rank1", TrackingConfig(), is_main=False, run_name="x")
other.log_params({{"a": 1}}); other.log(1, {{"train/bpd": 1.0}}); other.set_tags({{"t": 1}})
other.log_event({{"kind": "loss_spike", "step": 1}}, {{"loss_spike": 1}})
assert other.log_summary({{}}) is None
other.log_artifact(root / "nothing.png"); other.close()
assert other.run_id is None and not (root / "rank1").exists()

off = MetricsSink(root / "off", TrackingConfig(enabled=False), is_main=True, run_name="off")
off.log_params({{"a": 1}}); off.log(1, {{"train/bpd": 1.0}}); off.log_event({{"kind": "k", "step": 1}}, {{"k": 1}})
off.close()
assert off.run_id is None and "mlflow" not in sys.modules
print(sorted(p.name for p in root.rglob("*")))
"""
    out = subprocess.run(
        [PYTHON, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env_for_subprocess(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # metrics.jsonl and events.jsonl are kept without MLflow; no database, no delivery state.
    assert out.stdout.strip() == "['events.jsonl', 'metrics.jsonl', 'off']"
    rows = jsonl(tmp_path / "off" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 1] and rows[1]["events/k"] == 1.0
