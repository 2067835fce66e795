"""One study run = one `python -m pipeline train` subprocess, and the summary it leaves.

The result of run ``name`` is ``<out>/results/<name>.json``: the run's own summary.json, which the
training loop writes on every way out with a ``status`` (finished, preempted, diverged, failed),
plus what the study varied and the command. A diverged run is a result of the study, not a failure
of it. A process that left no summary (killed) is "crashed", with the log's last lines; one not run
by this process that left none yet (a cluster job) is "incomplete".

A finished or diverged run is not started again, so rerunning a study continues it; any other run,
or a run folder left by an interrupted process, is started again and resumes from its last
checkpoint (the loop's exact resume). Logs go to ``<out>/logs/<name>.log``.

Runs are single processes, so ``run_all`` can keep ``jobs`` of them going at once (each with
OMP_NUM_THREADS=1, a core each); every slot gets its own MASTER_PORT (the given one plus the slot:
a plain process binds it for its group of one).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.io import atomic_write_text, json_safe

ROOT = Path(__file__).resolve().parents[2]  # the checkout (or /opt/lipflow in the image)
DONE = ("finished", "finished_damaged", "diverged")  # results; any other run is started again


def shipped(path: str) -> str:
    """A path as given when it exists from here, else relative to the checkout (configs/...)."""
    return path if Path(path).exists() or not (ROOT / path).exists() else str(ROOT / path)


@dataclass
class RunSpec:
    name: str
    overrides: list[str]
    meta: dict[str, Any] = field(default_factory=dict)  # what the study varies: arm, lr, seed, ...


@dataclass
class Runner:
    """Runs specs sequentially under ``out``: run folders in <out>/runs (one MLflow store)."""

    out: Path
    config: str | None
    launcher: list[str] = field(default_factory=lambda: [sys.executable, "-m", "pipeline", "train"])
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment

    @property
    def run_root(self) -> Path:
        return self.out / "runs"

    def run_dir(self, name: str) -> Path:
        return self.run_root / name

    def result_path(self, name: str) -> Path:
        return self.out / "results" / f"{name}.json"

    def summary_path(self, name: str) -> Path:
        """The summary the loop writes in the run folder on every way out."""
        return self.run_dir(name) / "summary.json"

    def log_path(self, name: str) -> Path:
        return self.out / "logs" / f"{name}.log"

    def command(self, spec: RunSpec) -> list[str]:
        config = ["--config", self.config] if self.config else []
        return [
            *self.launcher,
            *config,
            f"run.root={self.run_root.resolve()}",
            f"run.name={spec.name}",
            *spec.overrides,
        ]

    def check(self, specs: list[RunSpec]) -> bool:
        """Resolve every run's config here first: a bad override fails once, with the reason,
        instead of crashing every run."""
        from pipeline.config import ConfigError, load_config

        for spec in specs:
            try:
                load_config(self.config, spec.overrides)
            except ConfigError as e:
                print(f"error: run {spec.name}: {e}", file=sys.stderr)
                return False
        return True

    def print_commands(self, specs: list[RunSpec]) -> None:
        """Each run's command, one a line (for a scheduler)."""
        for spec in specs:
            print(shlex.join(self.command(spec)))

    def train(self, spec: RunSpec, slot: int = 0) -> tuple[dict, bool]:
        """(the run's result, whether it was taken from an earlier invocation); ``slot``: which of
        ``run_all``'s concurrent processes this is (its MASTER_PORT offset)."""
        path = self.result_path(spec.name)
        if path.is_file():
            earlier = json.loads(path.read_text())
            if earlier.get("status") in DONE:
                return earlier, True
        path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path(spec.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command(spec)
        self.summary_path(spec.name).unlink(missing_ok=True)  # only this process's outcome counts
        start = time.perf_counter()
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            code = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=subprocess_env(self.slot_env(slot))
            ).returncode
        result = self.collect(spec, code, log.read_text(errors="replace"))
        result["wall_s"] = time.perf_counter() - start
        self.save(spec, result)
        return result, False

    def pipeline_json(self, args: list[str], name: str) -> dict:
        """Another `python -m pipeline` command for run ``name`` that writes its JSON result to
        ``--json-out`` (e.g. a probe of its checkpoint), logged to the run's log; that object
        (RuntimeError if it fails)."""
        return pipeline_json(args, self.log_path(name), self.env)

    def save(self, spec: RunSpec, result: dict) -> None:
        """(Re)write the run's result file (e.g. with what the study added after training)."""
        write_json(self.result_path(spec.name), result)

    def slot_env(self, slot: int) -> dict[str, str]:
        """The extra environment of concurrent process ``slot``: MASTER_PORT shifted by the slot;
        without a MASTER_PORT, each process picks a free port itself."""
        env = dict(self.env)
        port = env.get("MASTER_PORT") or os.environ.get("MASTER_PORT")
        if port and slot:
            env["MASTER_PORT"] = str(int(port) + slot)
        return env

    def run_all(
        self, specs: list[RunSpec], work: Callable[[RunSpec, int], Any], jobs: int = 1
    ) -> Iterator[tuple[int, Any]]:
        """``work(spec, slot)`` for every spec, ``jobs`` at a time, each slot a distinct integer in
        [0, jobs); yields (index into specs, what work returned) as runs end."""
        if jobs <= 1:
            for i, spec in enumerate(specs):
                yield i, work(spec, 0)
            return
        free, lock = list(range(jobs)), threading.Lock()

        def task(i: int) -> tuple[int, Any]:
            with lock:
                slot = free.pop()
            try:
                return i, work(specs[i], slot)
            finally:
                with lock:
                    free.append(slot)

        with ThreadPoolExecutor(jobs) as pool:
            pending: set[Future] = {pool.submit(task, i) for i in range(len(specs))}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()

    def find(self, spec: RunSpec) -> dict:
        """What a run left, starting nothing: its result file, else what its folder and log say
        (e.g. a run submitted as a cluster job)."""
        path = self.result_path(spec.name)
        if path.is_file():
            return json.loads(path.read_text())
        log = self.log_path(spec.name)
        return self.collect(spec, None, log.read_text(errors="replace") if log.is_file() else "")

    def collect(self, spec: RunSpec, returncode: int | None, log_text: str = "") -> dict:
        """The run's summary, with what the study varied; ``returncode`` None: not run by this
        process (a cluster job), so a run without a summary is still "incomplete"."""
        summary = self.summary_path(spec.name)
        if summary.is_file():
            result = json.loads(summary.read_text())
        elif returncode is None:
            result = {"status": "incomplete"}
        else:
            result = {"status": "crashed", "log_tail": log_text.strip().splitlines()[-15:]}
        result.update(
            name=spec.name,
            study=spec.meta,
            returncode=returncode,
            command=shlex.join(self.command(spec)),
        )
        return result


def add_runner_arguments(p: argparse.ArgumentParser) -> None:
    """Options of every training study: how runs start, continue, or are only tabulated."""
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip runs whose result exists and continue interrupted ones (default); "
        "--no-resume refuses an --out that already holds runs",
    )
    p.add_argument(
        "--launcher",
        help="command taking `pipeline train` arguments (default: this python -m pipeline train), "
        "e.g. launch/local.sh (ranks from NPROC) or 'sbatch --wait launch/slurm.sbatch'",
    )
    p.add_argument(
        "--master-port",
        type=int,
        help="MASTER_PORT for the training processes (concurrent ones: this port + their slot)",
    )
    p.add_argument("--dry-run", action="store_true", help="print each run's command and exit")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="start nothing: tabulate what the runs under --out left (e.g. ones run as cluster jobs)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="section.key=value overrides for every run: right after the study name, or after --",
    )


def make_runner(args: argparse.Namespace, config: str | None) -> Runner | None:
    """The Runner for ``args``; None (the reason printed) when --no-resume finds earlier runs."""
    out = Path(args.out)
    if not args.resume and any((out / d).exists() for d in ("results", "runs")):
        print(
            f"error: {out} already holds runs; give a new --out, or drop --no-resume to continue",
            file=sys.stderr,
        )
        return None
    runner = Runner(out=out, config=str(Path(shipped(config)).resolve()) if config else None)
    if args.launcher:
        runner.launcher = shlex.split(args.launcher)
    if args.master_port:
        runner.env["MASTER_PORT"] = str(args.master_port)
    return runner


def pipeline(args: list[str], log: Path, env: dict[str, str] | None = None) -> str:
    """Run another `python -m pipeline` command, its output appended to ``log``; its stdout."""
    cmd = [sys.executable, "-m", "pipeline", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(env or {}))
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n{out.stdout}{out.stderr}")
    if out.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(cmd)} failed with exit status {out.returncode}; see {log}:\n"
            + "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
        )
    return out.stdout


def pipeline_json(args: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run a `python -m pipeline` command that takes ``--json-out PATH`` (probe, evaluate), logged
    as ``pipeline`` does; the JSON object it wrote to PATH, read from the file, never from stdout
    (RuntimeError if it fails or writes none)."""
    with tempfile.TemporaryDirectory(prefix="lipflow-json-") as tmp:
        path = Path(tmp) / "result.json"
        pipeline([*args, "--json-out", str(path)], log, env)
        if not path.is_file():
            raise RuntimeError(
                f"python -m pipeline {args[0]} exited 0 but wrote no result; see {log}"
            )
        return json.loads(path.read_text())


def subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment, with the checkout importable from any working directory (relative paths
    in overrides keep meaning what they mean here)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: the rest of the file still counts
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(data), indent=1))
