"""Issue 6 behaviours through the real entry point: guard, preemption, exact resume, checkpoints."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pipeline.train import checkpoint
from tests.conftest import PYTHON, ROOT, env_for_subprocess, run_pipeline, run_together


def run_args(tmp_path, name, *overrides) -> list[str]:
    """The options of a debug.yaml run <tmp_path>/runs/<name>, summary <name>.json."""
    return [
        "--config",
        "configs/debug.yaml",
        f"run.root={tmp_path}/runs",
        f"run.name={name}",
        f"data.cache={tmp_path}/data",
        "guard.diagnostics_every=0",
        "--summary-json",
        str(tmp_path / f"{name}.json"),
        *overrides,
    ]


def launch_command(tmp_path, name, *overrides, port=29641) -> tuple[list, dict]:
    """(argv, environment) of that run in one process, for ``run_together``."""
    cmd = [PYTHON, "-m", "pipeline", "train", *run_args(tmp_path, name, *overrides)]
    return cmd, env_for_subprocess(MASTER_PORT=str(port))


def launch(tmp_path, name, *overrides, ranks=1, port=29641, check=True, timeout=600):
    """That run: one process, or ``ranks`` under the launcher."""
    args = run_args(tmp_path, name, *overrides)
    return run_pipeline(
        *(args if ranks > 1 else ["train", *args]),
        check=check,
        launcher=ranks > 1,
        timeout=timeout,
        MASTER_PORT=str(port),
        NPROC=str(ranks),
    )


def summary(tmp_path, name) -> dict:
    return json.loads((tmp_path / f"{name}.json").read_text())


def events(tmp_path, name) -> list[dict]:
    path = tmp_path / "runs" / name / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def bpd_by_step(tmp_path, name) -> dict[int, float]:
    rows = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/bpd"] for r in map(json.loads, rows) if "train/bpd" in r}


def final_weights(tmp_path, name) -> dict[str, torch.Tensor]:
    folder = checkpoint.find_latest(tmp_path / "runs" / name / "checkpoints")
    return torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)["module"]


def test_half_written_checkpoint_is_never_picked_up(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in [(3, True), (6, True), (9, False)]:
        folder = root / checkpoint.tag_for(step)
        folder.mkdir(parents=True)
        (folder / "trainstate.json").write_text(json.dumps({"step": step}))
        if complete:
            (folder / checkpoint.COMPLETE).write_text("")
    (root / "latest").write_text("step00000009")  # a pointer to the cut-short save
    assert checkpoint.find_latest(root) == root / "step00000006"
    (root / "latest").write_text("step00000003")
    assert checkpoint.find_latest(root) == root / "step00000003"
    (root / "step00000006" / "trainstate.json").write_text(json.dumps({"step": 6, "suspect": True}))
    assert checkpoint.find_good(root) == root / "step00000003"
    assert checkpoint.find_good(root, before=3) is None


# The guard tests' runs, independent of each other: started together (one core each) by the module
# fixture below, each test reads its own.
GUARD_RUNS = {
    "spike": (
        "train.steps=30",
        "train.save_every=5",
        "faults.lr_spike_step=15",
        "faults.lr_spike_steps=3",
        "guard.min_history=5",
        "guard.rollback_events=2",
    ),
    "stop": (
        "train.steps=30",
        "train.save_every=5",
        "faults.lr_spike_step=15",
        "faults.lr_spike_steps=30",
        "faults.lr_spike_factor=1e5",
        "guard.min_history=5",
        "guard.rollback_events=1",
        "guard.max_rollbacks=1",
    ),
    # keep_last=1 and events right after a checkpoint (see the escalation test)
    "deep": (
        "train.steps=40",
        "train.save_every=4",
        "train.keep_last=1",
        "faults.lr_spike_step=10",
        "faults.lr_spike_steps=40",
        "faults.lr_spike_factor=1e5",
        "guard.min_history=5",
        "guard.rollback_events=1",
        "guard.max_rollbacks=3",
    ),
}


@pytest.fixture(scope="module")
def guard_runs(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """(the runs' root, {name: its finished process}) of GUARD_RUNS."""
    root = tmp_path_factory.mktemp("guard")
    commands = {
        name: launch_command(root, name, *overrides, port=29646 + i)
        for i, (name, overrides) in enumerate(GUARD_RUNS.items())
    }
    return root, run_together(commands)


def test_lr_spike_rolls_back_cuts_the_lr_and_finishes(guard_runs):
    root, runs = guard_runs
    out = runs["spike"]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    s = summary(root, "spike")
    assert s["status"] == "finished" and s["rollbacks"] >= 1
    # the sampler check at the save of step 15 sees the first spiked update (reconstruction error
    # ~3e3), the next step's loss spikes (finite since the prior's log σ is bounded)
    assert s["event_counts"]["inverse_error"] >= 1 and s["event_counts"]["loss_spike"] >= 1
    bpd = bpd_by_step(root, "spike")
    assert sorted(bpd) == list(range(1, 31))  # one row per step, none repeated by the rollback
    assert all(torch.isfinite(w).all() for w in final_weights(root, "spike").values())
    assert bpd[30] < bpd[1]  # it recovered and kept learning


def test_guard_stops_with_a_diverged_summary_when_rollbacks_run_out(guard_runs):
    root, runs = guard_runs
    out = runs["stop"]
    assert out.returncode != 0
    assert out.returncode == 3 and "Traceback" not in out.stderr
    assert "error: diverged after 1 rollbacks" in out.stderr and "summary.json" in out.stderr
    s = summary(root, "stop")
    assert s == json.loads((root / "runs" / "stop" / "summary.json").read_text())
    assert s["status"] == "diverged" and s["rollbacks"] == 1 and s["final_val_bpd"] is None
    assert s["event_counts"]["non_finite_loss"] >= 1 and s["last_events"]
    assert s["checkpoint"] and s["mlflow_run_id"]


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    args = [
        "--config",
        "configs/debug.yaml",
        f"run.root={tmp_path}/runs",
        "run.name=pre",
        f"data.cache={tmp_path}/data",
        "train.steps=100000",
        "train.save_every=100000",
        "guard.diagnostics_every=0",
        "--summary-json",
        str(tmp_path / "pre.json"),
    ]
    proc = subprocess.Popen(
        [PYTHON, "-m", "pipeline", "train", *args],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env_for_subprocess(MASTER_PORT="29645"),
    )
    metrics = tmp_path / "runs" / "pre" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-3000:]
    assert time.time() - sent < 60
    s = summary(tmp_path, "pre")
    assert s["status"] == "preempted" and 3 <= s["steps"] < 100000
    assert Path(s["checkpoint"]).name == checkpoint.tag_for(s["steps"])
    assert "SIGTERM: checkpoint at step" in stdout


# Two ranks, 8 steps, checkpoints at steps 4 and 8, a NaN batch on rank 1 at step 3.
TWO_RANKS = ("train.steps=8", "train.save_every=4", "faults.nan_step=3", "faults.nan_rank=1")


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory) -> Path:
    """The NaN test's run, and the uninterrupted reference of the exact-resume test (each 2-rank
    launch costs ~20 s here); run name "nan" under the returned root."""
    root = tmp_path_factory.mktemp("two-ranks")
    launch(root, "nan", *TWO_RANKS, ranks=2, port=29642)
    return root


@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_on_every_rank(nan_run):
    s = summary(nan_run, "nan")
    assert s["status"] == "finished" and s["skipped_steps"] == 1 and s["steps"] == 8
    kinds = {(e["step"], e["kind"]) for e in events(nan_run, "nan")}
    assert (3, "non_finite_loss") in kinds
    assert all(torch.isfinite(w).all() for w in final_weights(nan_run, "nan").values())


@pytest.mark.slow
def test_exact_resume_after_sigkill_two_ranks(nan_run):
    """Killed right after the checkpoint of step 4, resumed: bitwise the uninterrupted run (the
    NaN run above: its skipped step 3 comes before the checkpoint)."""
    root = nan_run  # the same data, another run folder
    crashed = launch(root, "crash", *TWO_RANKS, "faults.sigkill_step=4", ranks=2, port=29644,
                     check=False)  # fmt: skip
    assert crashed.returncode != 0
    assert checkpoint.find_latest(root / "runs" / "crash" / "checkpoints").name == "step00000004"
    out = launch(root, "crash", *TWO_RANKS, ranks=2, port=29644)
    assert "resumed from" in out.stdout and "step00000004" in out.stdout
    straight, resumed = final_weights(root, "nan"), final_weights(root, "crash")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # bitwise
    a, b = bpd_by_step(root, "nan"), bpd_by_step(root, "crash")
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]  # same batches, same order
    assert summary(root, "crash")["skipped_steps"] == 1  # the skip before the crash is kept


@pytest.mark.slow
def test_exact_resume_under_zero_2_and_bf16(tmp_path):
    """The celebahq configs' ZeRO 1/2 optimizer states hold DeepSpeed objects (its loss scaler,
    ZeRO-stage enum, fragment addresses) that a weights-only load refuses unless allowed by name:
    without that, such runs could not resume at all. Resumed = uninterrupted, bitwise."""
    common = ("train.steps=6", "train.save_every=4", "train.zero_stage=2", "train.precision=bf16")
    runs = run_together(  # the uninterrupted run and the one killed, side by side
        {
            "straight": launch_command(tmp_path, "straight", *common, port=29645),
            "crashed": launch_command(
                tmp_path, "resumed", *common, "faults.sigkill_step=4", port=29649
            ),
        }
    )
    straight_run = runs["straight"]
    assert straight_run.returncode == 0, straight_run.stdout[-3000:] + straight_run.stderr[-3000:]
    assert runs["crashed"].returncode != 0
    out = launch(tmp_path, "resumed", *common, port=29645)
    assert "resumed from" in out.stdout and "step00000004" in out.stdout
    straight, resumed = final_weights(tmp_path, "straight"), final_weights(tmp_path, "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    a, b = bpd_by_step(tmp_path, "straight"), bpd_by_step(tmp_path, "resumed")
    assert [a[s] for s in (5, 6)] == [b[s] for s in (5, 6)]


def test_step_of_inverts_tag_for(tmp_path):
    for step in (0, 7, 123456):
        assert checkpoint.step_of(tmp_path / checkpoint.tag_for(step)) == step
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        checkpoint.step_of(tmp_path / "latest")


def test_escalation_reaches_its_depth_when_rotation_has_removed_older_checkpoints(guard_runs):
    """keep_last=1 and events right after a checkpoint: that checkpoint is marked suspect after one
    rollback and every older one was rotated away. The initial weights (step 0) are never rotated
    away, so the guard still tries the LR at 1/2, 1/4, 1/8 before it stops."""
    root, runs = guard_runs
    out = runs["deep"]
    s = summary(root, "deep")
    assert out.returncode == 3 and s["status"] == "diverged", out.stdout[-2000:]
    assert s["rollbacks"] == 3 and s["lr_scale"] == pytest.approx(1 / 8)
    targets = [
        line.split()[4].rstrip(",") for line in out.stdout.splitlines() if "rolled back" in line
    ]
    assert len(targets) == 3 and targets[0] == "step00000008"
    kept = sorted(p.name for p in (root / "runs" / "deep" / "checkpoints").glob("step*"))
    assert kept[0] == "step00000000"  # never rotated away


# The study's damaged run (docs/studies.md §1), made deterministic: at step 12 the split priors'
# log σ bias jumps to 1000 (an unbounded prior, as before issue 22), so every sample overflows while
# loss, gradients and log-dets stay finite. Step events cannot roll back here (rollback_events=100):
# after the one jump of the loss (and the spikes until its level catches up) only the sampler
# checks before each save (steps 15, 20, ...) see the damage.
DAMAGED = (
    "train.steps=30",
    "train.save_every=5",
    "faults.damage_step=12",
    "model.prior_log_std_bound=0",
    "guard.min_history=5",
    "guard.rollback_events=100",
)


def test_damaged_weights_seen_only_by_the_sampler_check_are_rolled_back(tmp_path):
    out = launch(tmp_path, "damaged", *DAMAGED)
    s = summary(tmp_path, "damaged")
    assert s["status"] == "finished" and s["rollbacks"] == 1, out.stdout[-2000:]
    assert "rolled back to step00000010" in out.stdout
    sampler = [
        (e["step"], e["kind"]) for e in events(tmp_path, "damaged") if e["kind"] == "sampler"
    ]
    assert sampler == [(15, "sampler"), (20, "sampler")]  # two checks in a row: the default
    assert s["battery"]["battery/sample_T1/nonfinite_frac"] == 0.0
    root = tmp_path / "runs" / "damaged" / "checkpoints"
    assert checkpoint.is_suspect(root / "step00000015")  # saved, never a rollback target
    assert not (root / "step00000020").exists()  # the rollback's weights are step 10's


def test_a_run_that_ends_with_a_damaged_sampler_says_so(tmp_path):
    """No escalation from checks (diagnostic_events=100): the run trains to the end with the
    damaged prior, and the final battery's verdict becomes its status, exit code and MLflow run."""
    out = launch(tmp_path, "kept", *DAMAGED, "guard.diagnostic_events=100", check=False)
    s = summary(tmp_path, "kept")
    assert out.returncode == 4 and s["status"] == "finished_damaged", out.stdout[-2000:]
    assert "non-finite samples at T=0.7 (100%)" in s["reason"] and "Traceback" not in out.stderr
    assert "error: the run finished but its model is damaged" in out.stderr
    assert "guard.allow_damaged=true" in out.stderr
    kinds = [e["kind"] for e in events(tmp_path, "kept")]
    assert kinds.count("sampler") == 4 and kinds[-1] == "damaged_model"  # steps 15-30, the end
    from mlflow.tracking import MlflowClient

    run = MlflowClient(s["tracking_uri"]).get_run(s["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["summary.status"] == "finished_damaged"
    assert s["mlflow_model"] is None  # a damaged model is not logged as the run's final model
