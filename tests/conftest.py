"""Shared test set-up: CPU DeepSpeed, few threads (2 shared cores), deterministic seeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


def run_pipeline(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` from the repository root; fails the test, with the output's tail,
    unless it exits 0."""
    out = subprocess.run(
        [PYTHON, "-m", "pipeline", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_for_subprocess(**env),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
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
