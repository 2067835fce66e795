"""A real one-node SLURM cluster on this machine, for the launch tests.

munged, slurmctld and slurmd run in the foreground as children of the test process, with their own
config, key, socket, ports and state under a temporary folder: nothing under /etc or /var is touched,
and a system SLURM (if any) is left alone. Clients find the cluster through SLURM_CONF.
CI installs the packages with .ci/install-slurm.sh; where they are missing, or the daemons cannot start
(not root, no such binaries), the tests are skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from pipeline.distributed import free_port

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
INSTALL_HINT = "install them with .ci/install-slurm.sh (apt-get install slurm-wlm munge)"


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=SBIN) is None]


class SlurmUnavailable(RuntimeError):
    """The cluster could not be started here; the message says why (the tests skip with it)."""


class LocalSlurm:
    """A one-node cluster: ``start()``, then ``sbatch`` / ``job`` / ``scontrol``; ``stop()`` at the end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.node = ""

    # -- environment for clients (and for jobs: sbatch exports the submitting environment) ---------
    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in (base or os.environ).items() if not k.startswith("SLURM_")}
        env.update(SLURM_CONF=str(self.conf), PATH=SBIN, **extra)
        return env

    def client(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(
            list(args), capture_output=True, text=True, env=self.env(), timeout=60, **kw
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        missing = missing_binaries()
        if missing:
            raise SlurmUnavailable(
                f"SLURM/MUNGE binaries missing: {', '.join(missing)}; {INSTALL_HINT}"
            )
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root to start jobs; run the tests as root")
        f = self.folder
        for sub in ("state", "spool"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        key = f / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # The node line as slurmd itself detects it (CPUs, memory), so the node registers as idle.
        detected = subprocess.run(
            [shutil.which("slurmd", path=SBIN), "-C"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[0]
        self.node = re.search(r"NodeName=(\S+)", detected).group(1)
        # Job ids differ between concurrent sessions, so do the rendezvous ports derived from them.
        first_job_id = 1000 + os.getpid() % 8000
        self.conf.write_text(
            f"""\
ClusterName=lipflowtest
SlurmctldHost={self.node}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={f}/munge.socket
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd.pid
SlurmctldLogFile={f}/slurmctld.log
SlurmdLogFile={f}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
FirstJobId={first_job_id}
{detected} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )
        # --force: munged refuses a socket folder that is not world-searchable (pytest's tmp is 0700).
        self._spawn(
            "munged",
            "--foreground",
            "--force",
            f"--socket={f}/munge.socket",
            f"--key-file={key}",
            f"--pid-file={f}/munged.pid",
            f"--seed-file={f}/munged.seed",
            f"--log-file={f}/munged.log",
        )
        self._wait(lambda: (f / "munge.socket").exists(), 10, "munged did not create its socket")
        self._spawn("slurmctld", "-D", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", self.node)
        self._wait(self._node_idle, 60, f"node {self.node} did not become idle in sinfo")

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.folder / f"{name}.stdout", "w")  # noqa: SIM115 (closed with the daemon)
        self.procs[name] = subprocess.Popen(
            [shutil.which(name, path=SBIN), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(),
        )

    def _node_idle(self) -> bool:
        out = self.client("sinfo", "-h", "-N", "-o", "%t", check=False)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{', '.join(dead)} exited: {self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"{what} within {timeout:.0f} s: {self.logs()}")

    def logs(self, tail: int = 15) -> str:
        parts = []
        for path in sorted(self.folder.glob("*.log")) + sorted(self.folder.glob("*.stdout")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is left, then end the daemons this object started (by their pids)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            ids = self.client("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if ids:
                self.client("scancel", *ids, check=False)
                deadline = time.monotonic() + 30
                while (
                    time.monotonic() < deadline
                    and self.client("squeue", "-h", "-o", "%i", check=False).stdout.split()
                ):
                    time.sleep(0.5)
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()

    # -- jobs -----------------------------------------------------------------------------------------
    def sbatch(self, *args: str, env: dict[str, str], cwd: Path) -> int:
        out = subprocess.run(
            ["sbatch", "--parsable", *args],
            capture_output=True,
            text=True,
            env=self.env(env),
            cwd=cwd,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        text = self.client("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for_end(self, job_id: int, timeout: float, release_requeued: bool = True) -> dict:
        """Poll until the job has ended. A requeued job waits ~2 min (SLURM's BeginTime hold) before it
        is eligible again; ``release_requeued`` makes it eligible as soon as the node has finished
        tearing down its previous run, as an admin would: slurmctld counts a step done before the
        node's slurmstepd has exited, and a run launched while it lives can fail at once."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info["JobState"]
            if state in ENDED:
                return info
            if (
                release_requeued
                and state == "PENDING"
                and info.get("Reason") == "BeginTime"
                and not step_daemons(job_id)
            ):
                self.client("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            time.sleep(1)
        raise AssertionError(f"job {job_id} still {state} after {timeout:.0f} s:\n{self.logs()}")


def step_daemons(job_id: int) -> list[str]:
    """Live slurmstepd processes of the job on this machine ("slurmstepd: [1234.batch]", ...)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if title.startswith(f"slurmstepd: [{job_id}."):
            found.append(title)
    return found
