"""Issue 15.3-15.5 through the real entry point: a resume under a changed config, verified
checkpoints, a full disk. One tiny trained run is shared; each test works on its own copy."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import ConfigError, load_config, save_config
from pipeline.train import checkpoint, compat
from tests.conftest import ROOT, run_pipeline

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
    return run_pipeline("train", *args, check=check)


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


# --- 15.4: verified checkpoints -------------------------------------------------------------------


def fake_checkpoint(root: Path, step: int, manifest: bool = True) -> Path:
    """A step folder with a model file and a trainstate, marked COMPLETE (a manifest, or the old
    empty marker)."""
    folder = root / checkpoint.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 8)
    (folder / "trainstate.json").write_text(json.dumps({"step": step}))
    if manifest:
        checkpoint.write_manifest(folder)
    else:
        (folder / checkpoint.COMPLETE).write_text("")
    (root / "latest").write_text(folder.name)
    return folder


def test_the_manifest_catches_a_truncated_changed_or_missing_file(tmp_path):
    folder = fake_checkpoint(tmp_path, 4)
    listed = json.loads((folder / checkpoint.COMPLETE).read_text())["files"]
    assert set(listed) == {"mp_rank_00_model_states.pt", "trainstate.json"}
    assert listed["mp_rank_00_model_states.pt"]["size"] == 2048
    assert checkpoint.first_mismatch(folder) is None
    model = folder / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:100])
    assert checkpoint.first_mismatch(folder) == (
        "mp_rank_00_model_states.pt: 100 bytes, the manifest says 2048"
    )
    model.write_bytes(bytes(2048))  # same size, other bytes
    assert (
        checkpoint.first_mismatch(folder)
        == "mp_rank_00_model_states.pt: sha256 differs from the manifest's"
    )
    model.unlink()
    assert checkpoint.first_mismatch(folder) == "mp_rank_00_model_states.pt: missing"


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_good_one(tmp_path):
    old = fake_checkpoint(tmp_path, 2, manifest=False)  # written before manifests: accepted
    good = fake_checkpoint(tmp_path, 4)
    newest = fake_checkpoint(tmp_path, 6)
    assert checkpoint.find_latest(tmp_path) == newest
    (newest / "trainstate.json").write_text("{}")
    damaged = []
    assert checkpoint.find_latest(tmp_path, damaged) == good
    assert damaged == [(newest, "trainstate.json: 2 bytes, the manifest says 11")]
    assert checkpoint.find_good(tmp_path) == good  # a rollback target is verified too
    (good / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert checkpoint.find_latest(tmp_path) == old
    assert checkpoint.find_good(tmp_path) == old
    assert "not verified" in checkpoint.describe_check(old, 0.0)
    assert "2 files" in checkpoint.describe_check(newest, 0.0)


def test_marking_a_checkpoint_suspect_keeps_its_manifest_valid(tmp_path):
    first, second = fake_checkpoint(tmp_path, 2), fake_checkpoint(tmp_path, 4)
    checkpoint.mark_suspect(second)
    assert checkpoint.first_mismatch(second) is None and checkpoint.find_latest(tmp_path) == second
    assert checkpoint.find_good(tmp_path) == first


def test_a_damaged_newest_checkpoint_is_reported_and_the_run_resumes_from_the_one_before(
    trained, tmp_path
):
    runs = copy_run(trained, tmp_path, "damaged")
    ckpts = runs / "damaged" / "checkpoints"
    model = ckpts / checkpoint.tag_for(4) / "mp_rank_00_model_states.pt"
    original = model.read_bytes()
    model.write_bytes(original[:100])  # damaged after it was marked COMPLETE
    out = train(runs, trained / "data", "damaged", *BASE)
    damaged = [line for line in out.stdout.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and str(ckpts / checkpoint.tag_for(4)) in damaged[0], out.stdout
    assert f"mp_rank_00_model_states.pt: 100 bytes, the manifest says {len(original)}" in damaged[0]
    resumed = [line for line in out.stdout.splitlines() if line.startswith("resumed from")]
    assert str(ckpts / checkpoint.tag_for(2)) in resumed[0] and "verified in" in resumed[0]
    events = [
        json.loads(line) for line in (runs / "damaged" / "events.jsonl").read_text().splitlines()
    ]
    assert [e["kind"] for e in events] == ["checkpoint_damaged"]
    assert events[0]["checkpoint"] == str(ckpts / checkpoint.tag_for(4)) and events[0]["step"] == 2
    summary = json.loads((runs / "damaged" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 4
    assert checkpoint.first_mismatch(ckpts / checkpoint.tag_for(4)) is None  # saved again, whole
    again = torch.load(model, weights_only=True)["module"]  # the same steps replayed exactly
    before = torch.load(
        trained / "runs/base/checkpoints/step00000004/mp_rank_00_model_states.pt", weights_only=True
    )["module"]
    assert all(torch.equal(again[k], before[k]) for k in before)


# --- 15.5: a full disk ----------------------------------------------------------------------------


def test_a_failed_save_removes_its_folder_and_tells_a_full_disk_from_other_failures(tmp_path):
    good = fake_checkpoint(tmp_path, 2)
    partial = tmp_path / checkpoint.tag_for(4)
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    assert checkpoint.save_failed(partial, RuntimeError("some bug")) is None  # space is plenty
    assert not partial.exists()
    partial.mkdir()
    try:
        raise RuntimeError("unexpected pos 128 vs 0") from OSError(errno.ENOSPC, "No space left")
    except RuntimeError as error:
        full = checkpoint.save_failed(partial, error)
    assert isinstance(full, checkpoint.DiskFullError) and not partial.exists()
    message = str(full)
    assert f"no space left to save checkpoint {partial}: " in message and "bytes free" in message
    assert f"still names {good.name}" in message and "\n" not in message


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs at tmp_path/disk (root only; skipped where mounting is not permitted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_stops_the_run_cleanly_and_the_same_command_resumes(trained, small_disk):
    runs, name = small_disk / "runs", "full"
    command = ("train.steps=5", "train.save_every=1", "train.keep_last=0")
    out = train(runs, trained / "data", name, *command, check=False)
    line = error_line(out)
    found = re.search(r"no space left to save checkpoint (\S+): ([\d,]+) bytes free", line)
    assert found, line
    partial = Path(found.group(1))
    assert not partial.exists() and int(found.group(2).replace(",", "")) >= 0
    ckpts = runs / name / "checkpoints"
    assert all((p / checkpoint.COMPLETE).is_file() for p in ckpts.glob("step*"))  # none partial
    latest = ckpts / (ckpts / "latest").read_text()
    assert checkpoint.first_mismatch(latest) is None and checkpoint.step_of(latest) < 5
    assert checkpoint.step_of(partial) == checkpoint.step_of(latest) + 1
    summary = json.loads((runs / name / "summary.json").read_text())
    assert summary["status"] == "failed" and "no space left" in summary["reason"]

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    out = train(runs, trained / "data", name, *command)
    assert f"resumed from {latest} " in out.stdout
    summary = json.loads((runs / name / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 5


def test_a_damaged_step_folder_given_to_a_command_is_refused(tmp_path):
    """sample/evaluate/export/probe verify a step folder given directly (a run folder's newest
    intact checkpoint is found by find_latest)."""
    from pipeline.train.inference import resolve_checkpoint

    good = fake_checkpoint(tmp_path, 4)
    assert resolve_checkpoint(good) == good
    (good / "trainstate.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match="trainstate.json: 2 bytes"):
        resolve_checkpoint(good)


def test_a_rollback_target_is_condemned_only_when_events_return_soon_after_it(tmp_path):
    """The same target twice: events within guard.rollback_window steps of the last rollback say
    its weights may be damaged (marked suspect, the next older good one is used); events 400
    steps later are a new excursion (seen in a demo trial: a rollback 450 healthy steps after the
    first went back to step 0), so the target stands."""
    from pipeline.theory import GuardConfig
    from pipeline.train.guard import rollback_target
    from pipeline.train.state import TrainState

    first, second = fake_checkpoint(tmp_path, 0), fake_checkpoint(tmp_path, 700)
    guard = GuardConfig()
    state = TrainState(step=819)
    assert rollback_target(tmp_path, state, guard) == second
    state.rollback_step, state.rolled_back_at = 700, 819
    state.step = 1271
    assert rollback_target(tmp_path, state, guard) == second
    assert not checkpoint.is_suspect(second)
    state.rolled_back_at = 1271
    state.step = 1271 + guard.rollback_window
    assert rollback_target(tmp_path, state, guard) == first
    assert checkpoint.is_suspect(second)
