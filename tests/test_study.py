"""`python -m pipeline study`: both studies end to end in their quick settings (real training
subprocesses), how a run's outcome is read from what it left, and the per-arm aggregation."""

from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path

import pytest

from pipeline.study import optimum, stability
from pipeline.study.runner import Runner, RunSpec
from tests.conftest import PYTHON, ROOT, env_for_subprocess


def study(*args: str, port: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "pipeline", "study", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env_for_subprocess(MASTER_PORT=port, MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false"),
    )


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def result(arm, lr, seed, status, bpd=None, events=None, rollbacks=0, skipped=0, steps=300):
    return {
        "name": f"{arm}-lr{lr:g}-seed{seed}",
        "study": {"arm": arm, "lr": lr, "seed": seed},
        "status": status,
        "final_val_bpd": bpd,
        "event_counts": events or {},
        "rollbacks": rollbacks,
        "skipped_steps": skipped,
        "steps": steps,
    }


def test_aggregate_counts_divergence_and_averages_only_finished_runs():
    nonfinite = {"non_finite_loss": 3, "non_finite_grad": 3}
    rows = stability.aggregate(
        [
            result("glow", 0.01, 0, "finished", 2.0, {"loss_spike": 2}, rollbacks=1, skipped=1),
            result("bounded", 0.01, 0, "finished", 2.1),
            result("glow", 0.01, 1, "finished", 2.2),
            result("bounded", 0.01, 1, "crashed", steps=120),
            result("glow", 0.01, 2, "diverged", None, nonfinite, rollbacks=3, skipped=4, steps=30),
            result("bounded", 0.01, 2, "finished", math.nan),  # finished, but no usable bpd
            result("bounded", 0.01, 3, "incomplete"),  # still running on a cluster: not counted
            result("glow", 0.1, 0, "diverged", None, nonfinite, rollbacks=3, skipped=3, steps=9),
        ]
    )
    assert [(r["arm"], r["lr"]) for r in rows] == [("glow", 0.01), ("bounded", 0.01), ("glow", 0.1)]
    glow, bounded, glow_high = rows
    assert set(glow) == set(stability.TABLE_COLUMNS)
    assert glow == {
        "arm": "glow",
        "lr": 0.01,
        "runs": 3,
        "finished": 2,
        "diverged": 1,
        "crashed": 0,
        "runs with events": 2,
        "events": 8,
        "rollbacks": 4,
        "skipped steps": 5,
        "mean steps": pytest.approx((300 + 300 + 30) / 3),
        "val bpd mean": pytest.approx(2.1),
        "val bpd std": pytest.approx(math.sqrt(0.02)),  # sample std of 2.0 and 2.2
        "val bpd n": 2,
    }
    assert (bounded["runs"], bounded["finished"], bounded["crashed"]) == (3, 2, 1)
    assert bounded["val bpd mean"] == pytest.approx(2.1) and bounded["val bpd n"] == 1
    assert bounded["val bpd std"] is None and bounded["events"] == 0
    assert glow_high["val bpd mean"] is None and glow_high["val bpd n"] == 0
    assert glow_high["diverged"] == glow_high["runs"] == 1


def write_rows(path: Path, rows: list) -> None:
    """JSON lines; a str is written as it is (a line cut short by a kill)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_a_runs_outcome_is_its_summary_and_nothing_else(tmp_path):
    runner = Runner(out=tmp_path, config=None)
    spec = RunSpec("glow-lr0.1-seed0", [], {"arm": "glow", "lr": 0.1, "seed": 0})
    run_dir = runner.run_dir(spec.name)
    run_dir.mkdir(parents=True)
    # What a run leaves besides its summary does not decide its outcome.
    (run_dir / "events.jsonl").write_text('{"step": 7, "kind": "non_finite_loss"}\n')
    log = "guard: rolled back to step00000000\n...\nDivergenceStop: guard asked for a rollback\n"

    crashed = runner.collect(spec, 1, log + "Traceback ...\nRuntimeError: killed\n")
    assert crashed["status"] == "crashed" and crashed["log_tail"][-1] == "RuntimeError: killed"
    assert runner.collect(spec, None, log)["status"] == "incomplete"  # a cluster job, not over yet

    diverged = {"status": "diverged", "reason": "diverged after 3 rollbacks", "steps": 14}
    runner.summary_path(spec.name).write_text(json.dumps({**diverged, "rollbacks": 3}))
    for returncode in (3, None):  # run here, or found after a cluster job
        result = runner.collect(spec, returncode)
        assert result["status"] == "diverged" and (result["steps"], result["rollbacks"]) == (14, 3)
        assert result["study"] == spec.meta and result["returncode"] == returncode


@pytest.mark.slow
def test_stability_study_quick_records_divergence_and_resumes(tmp_path):
    out = tmp_path / "stability"
    first = study("stability", "--quick", "--out", str(out), port="29931")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    columns, rows = read_csv(out / "stability.csv")
    assert columns == stability.TABLE_COLUMNS
    by_key = {(r["arm"], float(r["lr"])): r for r in rows}
    assert set(by_key) == {(a, lr) for a in ("glow", "bounded") for lr in (1e-3, 10.0)}
    for arm in ("glow", "bounded"):
        calm, wild = by_key[(arm, 1e-3)], by_key[(arm, 10.0)]
        assert (calm["runs"], calm["finished"], calm["diverged"]) == ("1", "1", "0")
        assert 0 < float(calm["val bpd mean"]) < 8
        # lr=10 makes the loss non-finite at once; with no rollbacks allowed the guard stops it
        assert (wild["runs"], wild["finished"], wild["diverged"]) == ("1", "0", "1")
        assert int(wild["events"]) >= 3 and int(wild["skipped steps"]) >= 3
        assert wild["val bpd mean"] == "" and wild["val bpd n"] == "0"
        assert int(float(wild["mean steps"])) < 12
        diverged = json.loads((out / "results" / f"{arm}-lr10-seed0.json").read_text())
        assert diverged["status"] == "diverged" and diverged["returncode"] == 3
        assert diverged["last_events"] and diverged["reason"].startswith("diverged after")

    _, runs = read_csv(out / "runs.csv")
    assert {r["run"]: r["status"] for r in runs} == {
        "glow-lr0.001-seed0": "finished",
        "bounded-lr0.001-seed0": "finished",
        "glow-lr10-seed0": "diverged",
        "bounded-lr10-seed0": "diverged",
    }
    # All four runs in one MLflow experiment, the compare report and plots beside the tables.
    _, compared = read_csv(out / "compare" / "compare.csv")
    assert sorted(r["run"] for r in compared) == sorted(r["run"] for r in runs)
    assert {r["status"] for r in compared if "lr10" in r["run"]} == {"FAILED"}
    assert (out / "compare" / "bpd.png").stat().st_size > 0
    assert (out / "stability.png").stat().st_size > 0
    report = (out / "stability.md").read_text()
    assert "| glow | 10 | 1 | 0 | 1 |" in report and "![stability](stability.png)" in report

    # Rerunning continues the study: nothing is trained again.
    logs = {p.name: p.stat().st_size for p in (out / "logs").glob("*-seed0.log")}
    again = study("stability", "--quick", "--out", str(out), port="29931")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(earlier)") == 4
    assert {p.name: p.stat().st_size for p in (out / "logs").glob("*-seed0.log")} == logs
    refused = study("stability", "--quick", "--no-resume", "--out", str(out), port="29931")
    assert refused.returncode == 2 and "already holds runs" in refused.stderr


@pytest.mark.slow
def test_optimum_study_quick_compares_linear_flows_with_the_closed_form(tmp_path):
    out = tmp_path / "optimum"
    done = study("optimum", "--quick", "--out", str(out), port="29932")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    columns, rows = read_csv(out / "optimum.csv")
    assert columns == optimum.COLUMNS
    assert [r["case"] for r in rows] == ["gaussian", "faces-8", "faces-16"]
    for row in rows:
        assert row["status"] == "finished" and int(row["train images"]) > 0
        achieved, best = float(row["achieved (train)"]), float(row["data optimum"])
        # A linear flow cannot beat its closed-form optimum (up to one dequantisation draw).
        assert achieved > best - 0.01, row
        assert float(row["gap"]) == pytest.approx(achieved - best)
    gaussian = rows[0]
    # The closed form on the shards is the covariance's analytic optimum, up to sampling.
    assert abs(float(gaussian["analytic optimum"]) - float(gaussian["data optimum"])) < 0.02
    assert all(r["analytic optimum"] == "" for r in rows[1:])
    assert "| gaussian | gaussian | 16 |" in (out / "optimum.md").read_text()
    assert (out / "compare" / "bpd.png").is_file()


def test_a_bad_override_fails_once_before_any_run(tmp_path):
    out = study(
        "stability", "--quick", "--out", str(tmp_path / "s"), "--", "train.lrr=1", port="29933"
    )
    assert out.returncode == 2
    assert "unknown config key 'train.lrr'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "s" / "runs").exists()
