"""Issue 15.1/15.2: bad values fail at config time, before any work, and every expected error is one
line `error: ...` (once under a launcher) with a non-zero exit; the traceback stays available."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from pipeline.config import ConfigError, load_config
from tests.conftest import ROOT, run_pipeline


def one_line_error(out: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a failed command, checked to come without a traceback."""
    lines = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode != 0 and len(lines) == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    return lines[0]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.steps=-5", "train.steps = -5: must be ≥ 1"),
        ("train.micro_batch=0", "train.micro_batch = 0: must be ≥ 1"),
        ("train.lr=0", "train.lr = 0.0: must be > 0"),
        ("model.width=0", "model.width = 0: must be ≥ 1"),
        ("data.n_bits=9", "data.n_bits = 9: must be in [1, 8]"),
        ("guard.rollback_lr_factor=1.5", "guard.rollback_lr_factor = 1.5: must be in (0, 1)"),
        ("data.resolution=17", "must be a multiple of 2^2 = 4"),
        ("model.levels=9", "use model.levels ≤ 4 or a resolution such as 512"),
    ],
)
def test_values_are_checked_when_the_config_is_loaded(override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(ROOT / "configs" / "debug.yaml", [override])


def test_shipped_configs_are_in_range():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)  # would raise on a value out of range


def test_a_bad_value_fails_in_one_line_before_any_work(tmp_path):
    out = run_pipeline(
        "train", "--config", "configs/debug.yaml", f"run.root={tmp_path}", "train.steps=-5",
        check=False,
    )  # fmt: skip
    assert one_line_error(out) == "error: train.steps = -5: must be ≥ 1"
    assert out.returncode == 2 and not any(tmp_path.iterdir())  # no run folder, no data


def test_a_missing_shard_folder_fails_in_one_line_before_any_work(tmp_path):
    missing = tmp_path / "nowhere"
    out = run_pipeline(
        "train", "--config", "configs/debug.yaml", f"run.root={tmp_path}/runs",
        "data.source=shards", f"data.shards={missing}", check=False,
    )  # fmt: skip
    assert str(missing) in one_line_error(out) and out.returncode == 1
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback_of_an_expected_error(tmp_path):
    args = ["config", "--config", "configs/debug.yaml", "train.steps=-5"]
    assert "Traceback" in run_pipeline(*args, "--debug", check=False).stderr
    assert "Traceback" in run_pipeline(*args, check=False, LIPFLOW_DEBUG="1").stderr


def test_a_failure_inside_a_run_keeps_its_traceback_in_the_run_folder(tmp_path):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("not a folder")
    out = run_pipeline(
        "train", "--config", "configs/debug.yaml", f"run.root={tmp_path}/runs", "run.name=r",
        f"data.cache={blocker}", check=False,
    )  # fmt: skip
    assert out.returncode != 0
    run = tmp_path / "runs" / "r"
    assert "Traceback" in (run / "error-rank0.log").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 0


@pytest.mark.slow
def test_an_error_under_the_launcher_is_printed_once(tmp_path):
    out = run_pipeline(
        "--config", "configs/debug.yaml", f"run.root={tmp_path}", "train.micro_batch=0",
        check=False, launcher=True, MASTER_PORT="29671", NPROC="2",
    )  # fmt: skip
    assert "train.micro_batch = 0: must be ≥ 1" in one_line_error(out)
