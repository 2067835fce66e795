"""Issue 15.3-15.5 through the real entry point: a resume under a changed config, verified
checkpoints, a full disk. One tiny trained run is shared; each test works on its own copy."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config, save_config
from pipeline.train import checkpoint, compat
from tests.conftest import PYTHON, ROOT, env_for_subprocess

FAST = (
    "guard.diagnostics_every=0",
    "guard.battery_images=0",
    "train.optimum_images=0",
    "tracking.enabled=false",
)


def train(root: Path, data: Path, name: str, *overrides: str, check: bool = True):
    """`python -m pipeline train` on the debug config, run folder <root>/<name>."""
    args = ["--config", "configs/debug.yaml", f"run.root={root}", f"run.name={name}"]
    args += [f"data.cache={data}", *FAST, *overrides]
    out = subprocess.run(
        [PYTHON, "-m", "pipeline", "train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env_for_subprocess(),
    )
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


BASE = ("train.steps=4", "train.save_every=2", "train.keep_last=0")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 0, 2 and 4 (the folder's root; name base)."""
    root = tmp_path_factory.mktemp("trained")
    train(root / "runs", root / "data", "base", *BASE)
    return root


def copy_run(trained: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the trained run as <tmp_path>/runs/<name>; returns the runs root."""
    shutil.copytree(trained / "runs" / "base", tmp_path / "runs" / name)
    return tmp_path / "runs"


def error_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0 and len(lines) == 1, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return lines[0]


# --- 15.3: a changed config on resume -------------------------------------------------------------


def saved_folder(tmp_path: Path, *overrides: str) -> Path:
    folder = tmp_path / checkpoint.tag_for(4)
    folder.mkdir()
    save_config(load_config(ROOT / "configs/debug.yaml", overrides), folder / "config.yaml")
    return folder


def test_keys_that_steer_the_rest_of_the_run_are_accepted_and_listed(tmp_path):
    folder = saved_folder(tmp_path, "train.steps=6")
    cfg = load_config(
        ROOT / "configs/debug.yaml",
        ["train.steps=10", "train.lr=3e-4", "run.root=/elsewhere", "tracking.enabled=false"],
    )
    changed = compat.check_resume(folder, cfg, world_size=1, saved_world_size=1)
    assert changed == [
        "run.root: 'runs' -> '/elsewhere'",
        "train.steps: 6 -> 10",
        "train.lr: 0.001 -> 0.0003",
        "tracking.enabled: True -> False",
    ]


@pytest.mark.parametrize(
    "override",
    ["model.width=8", "data.seed=1", "train.micro_batch=4", "train.seed=3", "train.zero_stage=1"],
)
def test_keys_that_change_the_model_or_data_stream_refuse_and_cannot_be_allowed(tmp_path, override):
    folder = saved_folder(tmp_path)
    key, value = override.split("=")
    for extra in ([], [f"train.allow_changed={key}"]):
        cfg = load_config(ROOT / "configs/debug.yaml", [override, *extra])
        with pytest.raises(ConfigError, match=f"{key}: .* -> {value}") as refused:
            compat.check_resume(folder, cfg, world_size=1, saved_world_size=1)
        message = str(refused.value)
        assert "\n" not in message and "use a new run.name" in message
        assert "allow_changed=" not in message


def test_overridable_keys_refuse_unless_allowed(tmp_path):
    folder = saved_folder(tmp_path)
    cfg = load_config(
        ROOT / "configs/debug.yaml", ["train.grad_clip=0.5", "model.memory=checkpoint"]
    )
    with pytest.raises(ConfigError) as refused:
        compat.check_resume(folder, cfg, world_size=1, saved_world_size=1)
    assert "model.memory: 'store' -> 'checkpoint'; train.grad_clip: 1.0 -> 0.5" in str(
        refused.value
    )
    assert "add train.allow_changed=model.memory,train.grad_clip" in str(refused.value)
    allowed = load_config(
        ROOT / "configs/debug.yaml",
        ["train.grad_clip=0.5", "model.memory=checkpoint", "train.allow_changed=train.grad_clip"],
    )
    with pytest.raises(ConfigError, match="allow_changed=model.memory "):
        compat.check_resume(folder, allowed, world_size=1, saved_world_size=1)


def test_a_different_number_of_ranks_refuses_and_cannot_be_allowed(tmp_path):
    folder = saved_folder(tmp_path)
    cfg = load_config(ROOT / "configs/debug.yaml", ["train.allow_changed=ranks"])
    with pytest.raises(ConfigError, match="ranks: 2 -> 1.*resume with 2 ranks"):
        compat.check_resume(folder, cfg, world_size=1, saved_world_size=2)


def test_an_unknown_or_removed_key_refuses(tmp_path):
    folder = saved_folder(tmp_path)
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    saved["model"]["gone_key"] = 1  # a key the tree no longer has: err on the side of refusing
    saved["train"]["rollback_events"] = 3  # the old layout of guard.rollback_events: compared there
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = load_config(ROOT / "configs/debug.yaml")
    with pytest.raises(ConfigError, match=r"model\.gone_key: 1 -> '\(absent\)'") as refused:
        compat.check_resume(folder, cfg, world_size=1, saved_world_size=1)
    assert "rollback_events" not in str(refused.value)


def test_a_changed_model_refuses_before_any_work_with_the_keys_and_what_to_do(trained, tmp_path):
    runs = copy_run(trained, tmp_path, "changed")
    before = sorted(p.name for p in (runs / "changed" / "checkpoints").iterdir())
    config_before = (runs / "changed" / "config.yaml").read_text()
    out = train(runs, trained / "data", "changed", *BASE, "model.width=8", check=False)
    line = error_line(out)
    assert "model.width: 16 -> 8" in line and "run.name" in line
    assert "allow_changed" not in line  # no override can make the weights fit
    assert "step " not in out.stdout  # no training step, no data or model built
    assert sorted(p.name for p in (runs / "changed" / "checkpoints").iterdir()) == before
    assert (runs / "changed" / "config.yaml").read_text() == config_before


def test_safe_and_allowed_changes_resume_and_are_reported(trained, tmp_path):
    runs = copy_run(trained, tmp_path, "longer")
    out = train(
        runs,
        trained / "data",
        "longer",
        "train.steps=6",
        "train.save_every=2",
        "train.keep_last=0",
        "train.grad_clip=0.5",
        "train.allow_changed=train.grad_clip",
    )
    changed = [line for line in out.stdout.splitlines() if "resuming with changed keys" in line]
    assert len(changed) == 1, out.stdout[-3000:]
    assert "train.steps: 4 -> 6" in changed[0] and "train.grad_clip: 1.0 -> 0.5" in changed[0]
    assert "resumed from" in out.stdout and checkpoint.tag_for(4) in out.stdout
    summary = json.loads((runs / "longer" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 6
