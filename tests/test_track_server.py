"""The metrics sink against a real `mlflow server` process on 127.0.0.1, killed and restarted mid-run.

Every server start costs ~25 s here (imports), so one server per session (tests/conftest.py
mlflow_server, shared with tests/test_launch.py); the outage test kills and restarts it and leaves
it running.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.distributed import free_port
from pipeline.track.sink import MetricsSink
from tests.test_track_sink import history, tracking

pytestmark = pytest.mark.slow

MLFLOW = Path(sys.executable).parent / "mlflow"


class Server:
    """`mlflow server` with a SQLite backend and proxied artifacts in ``root``, in its own process
    group so that SIGKILL takes its workers down too."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def launch(self) -> None:
        self.starts += 1
        self.log = self.root / f"server-{self.starts}.log"
        self.output = open(self.log, "w")  # noqa: SIM115 (closed in kill)
        self.proc = subprocess.Popen(
            [
                str(MLFLOW),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'backend.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=self.output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not come up:\n{self.log.read_text()[-3000:]}"
                )
            time.sleep(0.3)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc is not None:
            self.output.close()
        self.proc = None


@pytest.fixture
def server(mlflow_server):
    return mlflow_server


def wait_for_steps(uri: str, run_id: str, key: str, steps: list[int], timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        got = [s for s, _ in history(uri, run_id, key)]
        if got == steps or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_sink_logs_to_a_real_server(server, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = tracking(uri=server.uri, experiment="server")
    sink = MetricsSink(tmp_path / "run", cfg, True, "served")
    sink.log_params({"train.lr": 3e-4, "model.levels": 3})
    for step in range(1, 21):
        sink.log(step, {"train/bpd": 6.0 - step / 10, "speed/images_per_s": 100.0 + step})
    sink.log_event(
        {"kind": "grad_norm_spike", "step": 12, "value": 40.0, "threshold": 9.0},
        {"grad_norm_spike": 1},
    )
    (tmp_path / "config.yaml").write_text("train:\n  lr: 3.0e-4\n")
    sink.log_artifact(tmp_path / "config.yaml")
    sink.log_summary({"final_val_bpd": 4.1})
    sink.close()
    assert sink.undelivered == 0

    client = MlflowClient(server.uri)
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.0003", "model.levels": "3"}
    assert [s for s, _ in history(server.uri, sink.run_id, "train/bpd")] == list(range(1, 21))
    assert history(server.uri, sink.run_id, "events/grad_norm_spike") == [(12, 1.0)]
    assert run.data.tags["events.grad_norm_spike"] == "1"
    assert {a.path for a in client.list_artifacts(sink.run_id)} == {
        "config.yaml",
        "events.jsonl",
        "summary.json",
    }
    local = client.download_artifacts(sink.run_id, "config.yaml", str(tmp_path / "dl"))
    assert Path(local).read_text() == "train:\n  lr: 3.0e-4\n"


def test_outages_lose_no_step_and_do_not_block_logging(server, tmp_path, capsys):
    """Kill the server mid-run, keep logging, restart it: every step arrives. Then a close during
    an outage, and a run started while the store is down: the next sinks deliver everything."""
    from mlflow.tracking import MlflowClient

    cfg = tracking(uri=server.uri, experiment="outage", retry_max_s=2.0)
    latency: dict[str, list[float]] = {"up": [], "down": [], "restarting": []}
    step = 0

    def log(sink: MetricsSink, phase: str) -> None:
        nonlocal step
        step += 1
        metrics = {"train/bpd": 5.0 - step / 1000, "optim/lr": 1e-3}
        t0 = time.perf_counter()
        sink.log(step, metrics)
        latency[phase].append(time.perf_counter() - t0)

    run_a = tmp_path / "a"
    quick_close = tracking(
        uri=server.uri, experiment="outage", retry_max_s=2.0, flush_timeout_s=1.0
    )
    sink = MetricsSink(run_a, quick_close, True, "a")
    a_id = sink.run_id
    sink.log_params({"train.lr": 1e-3})
    for _ in range(20):
        log(sink, "up")
        time.sleep(0.01)
    assert sink.flush(30)

    server.kill()  # SIGKILL: no goodbye to open connections
    for _ in range(100):
        log(sink, "down")
        time.sleep(0.02)
    sink.log_event({"kind": "loss_spike", "step": step}, {"loss_spike": 1})
    sink.set_tags({"phase": "outage"})
    assert sink.pending() > 0
    server.launch()  # same port, same backend store
    while not server.healthy():
        log(sink, "restarting")
        time.sleep(0.1)
    server.wait_healthy()
    last = step
    got = wait_for_steps(server.uri, a_id, "train/bpd", list(range(1, last + 1)), 60)
    assert got == list(range(1, last + 1))
    assert sink.flush(30)
    run = MlflowClient(server.uri).get_run(a_id)
    assert run.data.tags["phase"] == "outage" and run.data.tags["events.loss_spike"] == "1"
    assert run.data.params == {"train.lr": "0.001"}

    # A close while the store is down leaves the backlog on disk and says how much.
    server.kill()
    for _ in range(30):
        log(sink, "down")
    t0 = time.perf_counter()
    sink.close()
    close_s = time.perf_counter() - t0
    assert sink.undelivered == 30
    state = json.loads((run_a / "tracking" / "state.json").read_text())
    assert state["undelivered"] == {"metric_rows": 30, "outbox_ops": 0}

    # A run that starts while the store is down: training starts, the run id comes later.
    run_b = tmp_path / "b"
    sink_b = MetricsSink(run_b, cfg, True, "b")
    assert sink_b.run_id is None
    sink_b.log_params({"train.lr": 5e-4})
    for s in range(1, 6):
        sink_b.log(s, {"train/bpd": 7.0 - s})

    server.launch()
    server.wait_healthy()
    assert sink_b.flush(60)
    b_id = sink_b.run_id
    assert b_id is not None
    assert [s for s, _ in history(server.uri, b_id, "train/bpd")] == [1, 2, 3, 4, 5]
    sink_b.close()

    # Resume of a: the backlog goes out first, then the new steps; one run, every step once.
    sink = MetricsSink(run_a, cfg, True, "a", run_id=a_id)
    for _ in range(10):
        log(sink, "up")
    sink.close()
    assert sink.undelivered == 0
    assert [s for s, _ in history(server.uri, a_id, "train/bpd")] == list(range(1, step + 1))
    assert MlflowClient(server.uri).get_run(a_id).info.status == "FINISHED"

    # Resume of b from a checkpoint written before its run existed (no run id in it).
    sink_b = MetricsSink(run_b, cfg, True, "b", run_id=None)
    assert sink_b.run_id == b_id
    sink_b.log(6, {"train/bpd": 1.0})
    sink_b.close()
    assert [s for s, _ in history(server.uri, b_id, "train/bpd")] == [1, 2, 3, 4, 5, 6]
    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["a", "b"]
    assert client.get_run(b_id).data.params == {"train.lr": "0.0005"}

    rows = [json.loads(line) for line in (run_a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/bpd" in r] == list(range(1, step + 1))
    with capsys.disabled():  # measured, reported, never asserted (shared machine)
        for phase, values in latency.items():
            ms = sorted(v * 1e3 for v in values)
            print(
                f"\nsink.log() with the server {phase}: {len(ms)} calls, mean "
                f"{statistics.mean(ms):.3f} ms, median {statistics.median(ms):.3f} ms, "
                f"p99 {ms[int(0.99 * (len(ms) - 1))]:.3f} ms, max {ms[-1]:.3f} ms",
                end="",
            )
        print(f"\nclose() with the server down, flush_timeout_s=1: {close_s:.2f} s")
