"""The cluster launchers, run for real: two nodes on one machine, and a local SLURM cluster.

launch/multinode.sh: the commands it builds (DRY_RUN=1) for the three modes, and real 2-node runs on
127.0.0.1 (two invocations, node ranks 0 and 1, one CPU rank each) through DeepSpeed --no_ssh and
torchrun, trained, checkpointed and resumed. launch/slurm.sbatch: jobs on a one-node SLURM cluster
started by the test (tests/slurm_helpers.py): a job that finishes with a checkpoint, the time-limit
signal path (checkpoint, requeue itself, resume), and `scontrol requeue` (the re-run resumes).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import PYTHON, ROOT, env_for_subprocess
from tests.slurm_helpers import LocalSlurm, SlurmUnavailable

LAUNCH = ROOT / "launch"


def dry_run(**knobs: str) -> subprocess.CompletedProcess:
    env = env_for_subprocess(PYTHON=PYTHON, DRY_RUN="1", **knobs)
    for key in ("LAUNCHER", "HOSTFILE", "NNODES", "NODE_RANK", "NPROC"):
        if key not in knobs:
            env.pop(key, None)
    return subprocess.run(
        [str(LAUNCH / "multinode.sh"), "--config", "configs/debug.yaml", "train.steps=9"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def command_of(out: subprocess.CompletedProcess) -> tuple[list[str], list[str]]:
    """(argv of the printed command, lines of the generated hostfile)."""
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    hostfile = [
        line.removeprefix("# hostfile: ") for line in lines if line.startswith("# hostfile")
    ]
    return shlex.split(lines[-1]), hostfile


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


TRAIN_ARGS = ["--module", "pipeline", "train", "--config", "configs/debug.yaml", "train.steps=9"]


def test_no_ssh_mode_builds_a_deepspeed_command_per_node_with_a_generated_hostfile():
    out = dry_run(NNODES="3", NODE_RANK="2", MASTER_ADDR="10.1.2.3", MASTER_PORT="29790", NPROC="4")
    argv, hostfile = command_of(out)
    assert argv[:3] == [PYTHON, "-m", "deepspeed.launcher.runner"]
    assert "--no_ssh" in argv and option(argv, "--node_rank") == "2"
    assert option(argv, "--num_gpus") == "4"
    assert (option(argv, "--master_addr"), option(argv, "--master_port")) == ("10.1.2.3", "29790")
    assert hostfile == ["node0 slots=4", "node1 slots=4", "node2 slots=4"]
    assert not Path(option(argv, "--hostfile")).exists()  # removed when the script exits
    assert argv[-7:] == ["--no_local_rank", *TRAIN_ARGS]


def test_hostfile_mode_lets_deepspeed_reach_the_nodes_over_ssh(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-a slots=8\ngpu-b slots=8\n")
    argv, generated = command_of(dry_run(HOSTFILE=str(hostfile), MASTER_ADDR="gpu-a"))
    assert option(argv, "--hostfile") == str(hostfile) and not generated
    assert "--no_ssh" not in argv and "--node_rank" not in argv
    assert "--num_gpus" not in argv  # every slot of the hostfile unless NPROC says otherwise
    assert option(argv, "--master_addr") == "gpu-a"
    argv, _ = command_of(dry_run(HOSTFILE=str(hostfile), NPROC="2"))
    assert option(argv, "--num_gpus") == "2" and "--master_addr" not in argv
    assert argv[-7:] == ["--no_local_rank", *TRAIN_ARGS]


def test_torchrun_mode_uses_a_static_rendezvous_at_the_master():
    out = dry_run(
        LAUNCHER="torchrun", NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", MASTER_PORT="29791"
    )
    argv, hostfile = command_of(out)
    assert argv[:3] == [PYTHON, "-m", "torch.distributed.run"] and not hostfile
    assert (option(argv, "--nnodes"), option(argv, "--node_rank")) == ("2", "1")
    assert option(argv, "--nproc_per_node") == "1"  # no GPU here: one CPU rank per node
    assert (option(argv, "--master_addr"), option(argv, "--master_port")) == ("node0", "29791")
    assert argv[-6:] == TRAIN_ARGS


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"NNODES": "2"}, "NNODES=2 needs NODE_RANK"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 is not in 0..1"),
        ({"NNODES": "2", "NODE_RANK": "1"}, "NNODES=2 needs MASTER_ADDR"),
        ({"LAUNCHER": "mpirun", "NODE_RANK": "0"}, "LAUNCHER=mpirun; use deepspeed or torchrun"),
    ],
)
def test_multinode_refuses_incomplete_knobs_with_the_reason(knobs, message):
    out = dry_run(**knobs)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_launch_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    scripts = sorted(str(p.relative_to(ROOT)) for p in LAUNCH.iterdir() if p.is_file())
    scripts.append(".ci/install-slurm.sh")
    out = subprocess.run([shellcheck, "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# --- two nodes on one machine ------------------------------------------------------------------


def run_two_nodes(
    tmp_path: Path, launcher: str, port: int, *overrides: str, system_metrics: bool = False
) -> str:
    """Node ranks 0 and 1 in parallel on 127.0.0.1, one rank each; returns node 0's output.

    With ``system_metrics`` each node monitors itself under the name node<rank> (both share this
    machine's hostname)."""
    procs = []
    for node_rank in (0, 1):
        env = env_for_subprocess(
            PYTHON=PYTHON,
            LAUNCHER=launcher,
            NNODES="2",
            NODE_RANK=str(node_rank),
            NPROC="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="true" if system_metrics else "false",
            LIPFLOW_NODE_NAME=f"node{node_rank}",
        )
        env.pop("HOSTFILE", None)
        log = open(tmp_path / f"node{node_rank}.log", "w")  # noqa: SIM115 (closed below)
        procs.append(
            subprocess.Popen(
                [
                    str(LAUNCH / "multinode.sh"),
                    "--config",
                    "configs/debug.yaml",
                    f"run.root={tmp_path}/runs",
                    f"data.cache={tmp_path}/data",
                    *overrides,
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group, so a hung node can be ended with its ranks
            )
        )
        log.close()
    deadline = time.monotonic() + 600
    try:
        codes = [p.wait(timeout=max(1, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    logs = [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(log[-3000:] for log in logs)
    return logs[0]


def train_bpd_steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/bpd" in r]


@pytest.mark.slow
@pytest.mark.parametrize("launcher, port", [("deepspeed", 29741), ("torchrun", 29742)])
def test_two_nodes_on_one_machine_train_checkpoint_and_resume(tmp_path, launcher, port, request):
    """Under DeepSpeed the nodes also report to a tracking server (the session's) with system
    metrics on: node 0's sink monitors node 0; node 1's local rank 0 joins the same MLflow run
    once rank 0 has broadcast its id, which only works through a store both nodes reach."""
    tracked = launcher == "deepspeed"
    server = request.getfixturevalue("mlflow_server") if tracked else None
    tracking = (
        (f"tracking.uri={server.uri}", "tracking.system_metrics_interval_s=0.5") if tracked else ()
    )
    first = run_two_nodes(tmp_path, launcher, port, *tracking, system_metrics=tracked)
    run = tmp_path / "runs" / "debug"
    assert "fresh start" in first
    assert (run / "checkpoints" / "latest").read_text() == "step00000006"
    ckpt = run / "checkpoints" / "step00000006"
    assert (ckpt / "COMPLETE").is_file()
    # One data position per rank: rank 0 ran on node 0, rank 1 on node 1, in one process group.
    assert {p.name for p in ckpt.glob("rank*.json")} == {"rank0.json", "rank1.json"}
    assert yaml.safe_load((ckpt / "config.yaml").read_text())["train"]["steps"] == 6
    assert train_bpd_steps(run) == list(range(1, 7))
    if tracked:
        assert_every_node_sent_system_metrics(server.uri, first)

    second = run_two_nodes(tmp_path, launcher, port, *tracking, "train.steps=9",
                           system_metrics=tracked)  # fmt: skip
    assert "resumed from" in second and "step00000006" in second
    assert (run / "checkpoints" / "latest").read_text() == "step00000009"
    assert train_bpd_steps(run) == list(range(1, 10))  # contiguous across the restart


def assert_every_node_sent_system_metrics(uri: str, node0_log: str) -> None:
    from mlflow.tracking import MlflowClient

    run_id = re.search(r"\(run ([0-9a-f]{32})\)", node0_log).group(1)
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    for node in ("node0", "node1"):
        assert f"system/{node}/cpu_utilization_percentage" in metrics, sorted(metrics)
    assert "train/bpd" in metrics


# --- SLURM -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        cluster.stop()
        pytest.skip(f"no local SLURM cluster: {exc}")
    yield cluster
    cluster.stop()


def submit(slurm: LocalSlurm, tmp_path: Path, *overrides: str, **knobs: str) -> tuple[int, Path]:
    log = tmp_path / "job.out"
    env = env_for_subprocess(
        PYTHON=PYTHON, NPROC="1", MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false", **knobs
    )
    job_id = slurm.sbatch(
        f"--output={log}",
        str(LAUNCH / "slurm.sbatch"),
        "--config",
        "configs/debug.yaml",
        f"run.root={tmp_path}/runs",
        f"data.cache={tmp_path}/data",
        *overrides,
        env=env,
        cwd=ROOT,
    )
    return job_id, log


def job_report(text: str, info: dict, slurm: LocalSlurm) -> str:
    """What a failed job assertion shows: the job log, SLURM's view of the job, the daemons' logs."""
    fields = ("JobState", "Reason", "ExitCode", "Restarts", "RunTime")
    return f"{text[-3000:]}\n{ {k: info.get(k) for k in fields} }\n{slurm.logs()}"


def wait_for_step(run: Path, step: int, slurm: LocalSlurm, job_id: int, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").is_file() and max(train_bpd_steps(run), default=0) >= step:
            return
        assert slurm.job(job_id)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach step {step} in {timeout} s")


def sigterm_checkpoint_step(text: str) -> int:
    """The step the ranks saved at on SIGTERM, from the job's log."""
    marker = "SIGTERM: checkpoint at step "
    assert marker in text, f"no checkpoint on SIGTERM in the job log:\n{text[-3000:]}"
    return int(text.split(marker)[1].split()[0])


@pytest.mark.slow
def test_sbatch_job_trains_to_a_checkpoint(slurm, tmp_path):
    job_id, log = submit(slurm, tmp_path)
    info = slurm.wait_for_end(job_id, timeout=300)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job_report(
        text, info, slurm
    )
    # Master address and port derived from the allocation and the job id.
    assert f"rendezvous {slurm.node}:{15000 + job_id % 10000}" in text
    assert "--no_ssh --node_rank 0" in text and "fresh start" in text
    ckpts = tmp_path / "runs" / "debug" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000006"
    assert (ckpts / "step00000006" / "COMPLETE").is_file()


@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm, tmp_path):
    # No periodic checkpoint between step 0 and the end: the one it resumes from is the signal's.
    steps = 120
    job_id, log = submit(slurm, tmp_path, f"train.steps={steps}", "train.save_every=1000")
    run = tmp_path / "runs" / "debug"
    wait_for_step(run, 3, slurm, job_id)
    # What --signal=B:USR1@120 does 2 minutes before the time limit: signal the batch script only.
    slurm.client("scancel", "--signal=USR1", "--batch", str(job_id))
    info = slurm.wait_for_end(job_id, timeout=300)
    text = log.read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), job_report(text, info, slurm)
    assert "time limit near" in text and f"requeueing job {job_id}" in text
    saved = sigterm_checkpoint_step(text)
    assert 3 <= saved < steps
    assert f"resumed from {run}/checkpoints/step{saved:08d}" in text
    assert (run / "checkpoints" / "latest").read_text() == f"step{steps:08d}"
    assert train_bpd_steps(run) == list(range(1, steps + 1))  # nothing lost, nothing repeated


@pytest.mark.slow
def test_requeued_job_reruns_the_same_command_and_resumes(slurm, tmp_path):
    # Through the container knobs: CONTAINER wraps each node's launcher (here a script that records
    # that it ran), SRUN_ARGS reaches srun (--label prefixes each output line with the task id).
    wrapper = tmp_path / "container.sh"
    wrapper.write_text(
        f'#!/bin/sh\necho "${{SLURM_RESTART_COUNT:-0}}" >> {tmp_path}/wrapped\nexec "$@"\n'
    )
    wrapper.chmod(0o755)
    steps = 120
    job_id, log = submit(
        slurm, tmp_path, f"train.steps={steps}", CONTAINER=str(wrapper), SRUN_ARGS="--label"
    )
    run = tmp_path / "runs" / "debug"
    wait_for_step(run, 3, slurm, job_id)
    slurm.client("scontrol", "requeue", str(job_id))
    info = slurm.wait_for_end(job_id, timeout=300)
    text = log.read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), job_report(text, info, slurm)
    assert "restart 0," in text and "restart 1," in text
    assert "0: fresh start" in text and "0: resumed from" in text
    assert (tmp_path / "wrapped").read_text().split() == ["0", "1"]
    # SLURM's SIGTERM (then SIGKILL after KillWait) reached the ranks through srun and the launcher:
    # they checkpointed at the step they were on, so the re-run neither repeats nor skips a step.
    saved = sigterm_checkpoint_step(text)
    assert f"resumed from {run}/checkpoints/step{saved:08d}" in text
    assert (run / "checkpoints" / "latest").read_text() == f"step{steps:08d}"
    assert train_bpd_steps(run) == list(range(1, steps + 1))
