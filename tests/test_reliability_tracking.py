"""Tracking never kills a run (issue 15.6): runs started together share one fresh SQLite store, and a
store that cannot even be created leaves metrics.jsonl, delivered once the store works."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.track.config import TrackingConfig
from pipeline.track.sink import MetricsSink
from tests.conftest import PYTHON, ROOT, env_for_subprocess
from tests.test_track_sink import sqlite_store

STEPS = 3


def tracking(**changes) -> TrackingConfig:
    return dataclasses.replace(
        TrackingConfig(experiment="lipflow", system_metrics=False, retry_max_s=0.5), **changes
    )


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def blocked_store(tmp_path: Path) -> tuple[Path, str]:
    """A SQLite URI whose folder is a plain file: the store cannot be created until it is removed."""
    folder = tmp_path / "store"
    folder.write_text("not a folder")
    return folder, f"sqlite:///{folder / 'mlflow.db'}"


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_a_store_that_cannot_be_created_degrades_then_gets_the_backlog(tmp_path):
    folder, uri = blocked_store(tmp_path)
    cfg = tracking(uri=uri, flush_timeout_s=30.0)
    sink = MetricsSink(tmp_path / "run", cfg, is_main=True, run_name="blocked")  # no exception
    assert sink.run_id is None and sink.uri == uri
    sink.log_params({"train.lr": 1e-3})
    for step in range(1, 4):
        sink.log(step, {"train/bpd": 5.0 - step})
    sink.log_event({"kind": "loss_spike", "step": 2, "value": 9.0}, {"loss_spike": 1})
    assert not sink.flush(1.5)  # retried meanwhile, still failing
    assert [r["step"] for r in jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 2]

    folder.unlink()
    sqlite_store(folder)  # the store works now (a ready-made one: creating it costs ~10 s)
    assert sink.flush(60.0), sink.pending()
    run_id = sink.run_id
    sink.close()
    assert sink.undelivered == 0
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.lr": "0.001"}
    assert metric_steps(uri, run_id, "train/bpd") == [1, 2, 3]
    assert run.data.tags["events.loss_spike"] == "1"


def launch(tmp_path: Path, name: str, *overrides: str) -> subprocess.Popen:
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [
            PYTHON,
            "-m",
            "pipeline",
            "train",
            "--config",
            "configs/debug.yaml",
            f"run.root={tmp_path}/runs",
            f"run.name={name}",
            f"data.cache={tmp_path}/data",
            f"train.steps={STEPS}",
            f"train.save_every={STEPS}",
            "guard.diagnostics_every=0",
            "guard.battery_images=0",
            "--summary-json",
            str(tmp_path / f"{name}.json"),
            *overrides,
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env_for_subprocess(),
    )


@pytest.mark.slow
def test_runs_started_together_share_one_fresh_store_and_a_broken_store_costs_no_run(tmp_path):
    """Three runs at the same moment under one fresh run root (one SQLite store: created and
    migrated once, under a lock) plus a fourth whose store cannot be created: all four finish, the
    three are in the shared store with every step, the fourth's metrics.jsonl reaches its store
    later through a sink on its folder (what a resume does)."""
    folder, uri = blocked_store(tmp_path)
    names = ["r0", "r1", "r2"]
    procs = {name: launch(tmp_path, name) for name in names}
    procs["offline"] = launch(
        tmp_path, "offline", f"tracking.uri={uri}", "tracking.flush_timeout_s=2"
    )
    deadline = time.monotonic() + 600
    for name, proc in procs.items():
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert code == 0, (
            f"{name} exited {code}:\n" + (tmp_path / f"{name}.log").read_text()[-4000:]
        )

    from mlflow.tracking import MlflowClient

    shared = f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    client = MlflowClient(shared)
    runs = client.search_runs([client.get_experiment_by_name("lipflow").experiment_id])
    assert sorted(r.info.run_name for r in runs) == names
    for run in runs:
        summary = json.loads((tmp_path / f"{run.info.run_name}.json").read_text())
        assert summary["status"] == "finished" and summary["mlflow_run_id"] == run.info.run_id
        assert run.info.status == "FINISHED"
        assert metric_steps(shared, run.info.run_id, "train/bpd") == list(range(1, STEPS + 1))

    offline = json.loads((tmp_path / "offline.json").read_text())
    assert offline["status"] == "finished" and offline["mlflow_run_id"] is None
    run_dir = Path(offline["run_dir"])
    rows = [r for r in jsonl(run_dir / "metrics.jsonl") if "train/bpd" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert "unreachable" in (tmp_path / "offline.log").read_text()

    folder.unlink()
    sqlite_store(folder)
    later = MetricsSink(run_dir, tracking(uri=uri), is_main=True, run_name="offline")
    later.close()
    assert later.undelivered == 0 and later.run_id
    assert metric_steps(uri, later.run_id, "train/bpd") == list(range(1, STEPS + 1))
