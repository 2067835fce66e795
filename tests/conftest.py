"""Shared test set-up: CPU DeepSpeed, few threads (2 shared cores), deterministic seeds."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture
def sigint_reaches_children():
    """A suite started in the background (nohup, `&` in a script) ignores SIGINT, and a child
    inherits that: one whose Ctrl-C is under test gets Python's own handler instead (a handled
    signal is reset to the default at exec, where Python installs it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def run_pipeline(
    *args: str, check: bool = True, launcher: bool = False, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` from the repository root (``launcher``: `launch/local.sh ARGS`, a
    training run under the DeepSpeed launcher, NPROC ranks), text output captured; ``env`` added to
    the environment. With ``check`` it fails the test, with the output's tail, unless it exits 0."""
    cmd = [str(ROOT / "launch" / "local.sh")] if launcher else [PYTHON, "-m", "pipeline"]
    out = subprocess.run(
        [*cmd, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_for_subprocess(**({"PYTHON": PYTHON} if launcher else {}), **env),
    )
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def run_together(
    commands: dict[str, tuple[list[str], dict[str, str]]], timeout: float = 600
) -> dict[str, subprocess.CompletedProcess]:
    """Start every command (name: (argv, environment)) at once from the repository root and wait
    for all; returns {name: its CompletedProcess, text output}, whatever the exit codes. For a
    test's independent single-process runs: each is one process of one thread, so two of them use
    both cores here and take about as long as one. Runs that bind a MASTER_PORT need one each."""
    procs = {}
    with contextlib.ExitStack() as files:
        for name, (argv, env) in commands.items():
            out, err = (files.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2))
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err, env=env)
            procs[name] = proc, out, err
        deadline, done = time.monotonic() + timeout, {}
        try:
            for name, (proc, out, err) in procs.items():
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                out.seek(0), err.seek(0)
                done[name] = subprocess.CompletedProcess(proc.args, code, out.read(), err.read())
        finally:
            for proc, _, _ in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return done


REGISTERED_MODEL = "lipflow-test-flow"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """The session's one trained tiny model: a debug.yaml run (6 steps, checkpoints at steps 0, 3
    and 6, MLflow in the SQLite store of its run root, its model logged and registered as
    REGISTERED_MODEL), trained once for every test that needs "a trained checkpoint" (probe,
    export, sample, evaluate, the MLflow model). Tests read it; the MLflow model tests also add to
    its store (tests/test_track_model.py); anything that would change its folders works on a copy.
    Keys: root (data/ and runs/ under it), run_dir, summary, uri."""
    root = tmp_path_factory.mktemp("tiny")
    run_pipeline(
        "train",
        "--config",
        "configs/debug.yaml",
        f"run.root={root}/runs",
        f"data.cache={root}/data",
        "run.name=tiny",
        "guard.battery_images=0",
        f"tracking.register_model={REGISTERED_MODEL}",
    )
    run_dir = root / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"root": root, "run_dir": run_dir, "summary": summary, "uri": summary["tracking_uri"]}


def launch_two_ranks(root: Path, port: int, *overrides: str) -> tuple[dict, str]:
    """`launch/local.sh --config configs/debug.yaml` on 2 CPU ranks, run root and data cache under
    ``root``; (its summary, its stdout). Fails the test, with the output's tail, unless it exits 0."""
    summary = root / "summary.json"
    out = run_pipeline(
        "--config",
        "configs/debug.yaml",
        f"run.root={root}/runs",
        f"data.cache={root}/data",
        *overrides,
        "--summary-json",
        str(summary),
        launcher=True,
        MASTER_PORT=str(port),
        NPROC="2",
    )
    return json.loads(summary.read_text()), out.stdout


TWO_RANK_PORT = 29651


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory) -> dict:
    """The session's one plain 2-rank run under the DeepSpeed launcher (each launch costs ~20 s
    here): debug.yaml with ZeRO 1, fp32, 2 micro-batches per step, diagnostics every 3 steps and
    DeepSpeed's wall-clock timers on; read by the launcher test (tests/test_train.py) and the ZeRO 1
    case of tests/test_engine.py. Keys: summary, stdout, port (its MASTER_PORT)."""
    summary, stdout = launch_two_ranks(
        tmp_path_factory.mktemp("two-ranks"),
        TWO_RANK_PORT,
        "train.zero_stage=1",
        "train.precision=fp32",
        "train.grad_accum=2",
        "guard.diagnostics_every=3",
        "train.deepspeed.wall_clock_breakdown=true",
    )
    return {"summary": summary, "stdout": stdout, "port": TWO_RANK_PORT}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """The session's one `mlflow server` (tests/test_track_server.py Server; each start costs
    ~10-25 s here), for the tracking-server tests and the two-node run that reports to it. A test
    may kill and relaunch it (same port, same store) but leaves it running."""
    from tests.test_track_server import Server

    server = Server(tmp_path_factory.mktemp("mlflow-server"))
    server.launch()
    server.wait_healthy()
    yield server
    server.kill()


def run_main(capsys, *args: str) -> str:
    """`python -m pipeline ARGS` in this process (pipeline.__main__.main, the entry point without a
    fresh interpreter: ~2.5 s less per call here); asserts it returns 0, returns its stdout."""
    from pipeline.__main__ import main

    capsys.readouterr()  # what earlier calls printed is not this one's
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, out[-3000:] + err[-3000:]
    return out


def env_for_subprocess(**extra: str) -> dict[str, str]:
    """Environment for launching `python -m pipeline` / deepspeed from a test."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def assert_save_load_reproduces(make, run, seeds: tuple[int, int] = (0, 5)) -> tuple:
    """`make(seed)` twice with different seeds (different outputs of `run(module)`), then the
    first's state dict saved and loaded into the second: `run` gives identical tensors, bit for
    bit. Returns (saved, loaded) for further checks. `run` seeds any randomness it uses."""
    import io

    saved, loaded = make(seeds[0]), make(seeds[1])
    assert not all(torch.equal(a, b) for a, b in zip(run(loaded), run(saved), strict=True))
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    loaded.load_state_dict(torch.load(buffer))
    for a, b in zip(run(loaded), run(saved), strict=True):
        assert torch.equal(a, b)
    return saved, loaded


def assert_every_parameter_has_a_gradient(module) -> None:
    """After a backward pass: every parameter got a finite gradient that is not all zeros."""
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def count_group_top(monkeypatch) -> list[int]:
    """Counts the normalisers' autograd-free part (lipschitz.group_top) from here on: [calls]."""
    from pipeline.flows import lipschitz

    calls, group_top = [0], lipschitz.group_top

    def counted(convs, update):
        calls[0] += 1
        return group_top(convs, update)

    monkeypatch.setattr(lipschitz, "group_top", counted)
    return calls
