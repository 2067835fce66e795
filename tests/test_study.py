"""`python -m pipeline study`: both studies end to end in their quick settings (real training
subprocesses), how a run's outcome is read from what it left, and the per-arm aggregation."""

from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path

import pytest

from pipeline.__main__ import main
from pipeline.study import optimum, stability
from pipeline.study.runner import Runner, RunSpec
from tests.conftest import PYTHON, env_for_subprocess, run_main, run_pipeline, run_together


def study_command(*args: str, port: str) -> tuple[list[str], dict[str, str]]:
    """`python -m pipeline study ARGS`: (argv, environment); its runs' ports start at ``port``."""
    env = env_for_subprocess(MASTER_PORT=port, MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
    return [PYTHON, "-m", "pipeline", "study", *args], env


def study(*args: str, port: str) -> subprocess.CompletedProcess:
    env = {"MASTER_PORT": port, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    return run_pipeline("study", *args, check=False, **env)


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def result(
    arm,
    lr,
    seed,
    status,
    bpd=None,
    events=None,
    rollbacks=0,
    skipped=0,
    steps=300,
    clip=True,
    precision="fp32",
    battery=None,
):
    cell = stability.Cell(lr, clip, None if precision == "fp32" else precision)
    return {
        "name": f"{arm}-{cell.tag}-seed{seed}",
        "study": {"arm": arm, "lr": lr, "clip": clip, "precision": precision, "seed": seed},
        "status": status,
        "final_val_bpd": bpd,
        "event_counts": events or {},
        "rollbacks": rollbacks,
        "skipped_steps": skipped,
        "steps": steps,
        **({"battery": battery} if battery else {}),
    }


@pytest.mark.parametrize(
    "k, n, lo, hi",
    [
        (0, 3, 0.0, 0.5615),
        (3, 3, 0.4385, 1.0),
        (1, 3, 0.0615, 0.7923),
        (5, 10, 0.2366, 0.7634),
        (0, 1, 0.0, 0.7935),
    ],
)
def test_wilson_interval_known_values(k, n, lo, hi):
    assert stability.wilson(k, n) == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_interval_is_all_of_0_1_without_runs_and_narrows_with_more():
    assert stability.wilson(0, 0) == (0.0, 1.0)
    for n in range(1, 40):  # exactly 0 and 1 at the ends, never a rounding past the rate
        assert stability.wilson(0, n)[0] == 0.0 and stability.wilson(n, n)[1] == 1.0
    widths = [hi - lo for lo, hi in (stability.wilson(n // 2, n) for n in (4, 16, 64))]
    assert widths == sorted(widths, reverse=True)


def test_plan_one_run_per_cell_seed_and_arm_with_its_overrides(tmp_path):
    sweep = stability.Sweep(
        config="configs/debug.yaml",
        steps=10,
        resolution=16,
        clip_lrs=(1e-2,),
        noclip_lrs=(3e-3,),
        bf16_lrs=(5e-2,),
        seeds=(0, 1),
    )
    specs = stability.plan(sweep, list(stability.ARMS), tmp_path, "exp", ["train.log_every=3"])
    assert len(specs) == 3 * 2 * 3
    by_name = {s.name: s for s in specs}
    clip = by_name["certified-lr0.01-clip-seed0"].overrides
    noclip = by_name["glow-lr0.003-noclip-seed1"].overrides
    bf16 = by_name["bounded-lr0.05-clip-bf16-seed0"].overrides
    assert "train.grad_clip=0" not in clip and "train.grad_clip=0" in noclip
    # bf16 cells set the precision; the others keep the config's (debug.yaml: fp32)
    assert "train.precision=bf16" in bf16 and not [o for o in clip + noclip if "precision" in o]
    assert by_name["certified-lr0.01-clip-seed0"].meta["precision"] == "fp32"
    # The certified arm is the model defaults: no model override at all.
    assert not [o for o in clip if o.startswith("model.")]
    assert set(stability.GLOW) <= set(noclip) and set(stability.OLD_BOUNDED) <= set(bf16)
    assert all(s.overrides[-1] == "train.log_every=3" for s in specs)
    assert by_name["glow-lr0.003-noclip-seed1"].meta == {
        "arm": "glow",
        "lr": 3e-3,
        "clip": False,
        "precision": "fp32",
        "seed": 1,
    }


# ModelConfig's defaults at commit ece3d61 (before issue 14 made the default certified), except the
# size (the study sets it) and the keys a glow step with plain subnets never reads.
OLD_DEFAULTS = {
    "block": "glow",
    "coupling": "affine",
    "conv": "svd",
    "actnorm": "bounded",
    "log_scale_bound": 2.0,
    "spectral_norm": False,
    "subnet_coeff": 1.0,
    "spectral_method": "exact",
    "affine_x_bound": 8.0,
    "split_prior": "learned",
    "memory": "store",
}
UNREAD = {  # by an old-bounded step: the size, residual blocks, spectral-norm settings
    "levels",
    "steps",
    "width",
    "scale_coeff",
    *(f"residual_{k}" for k in ("coeff", "terms", "logdet", "tol", "max_iter")),
}
# Keys added since, with the value that gives the old behaviour.
NEW_KEYS_OLD_VALUE = {"coupling_log_scale_bound": 2.0, "prior_log_std_bound": 0.0}


def test_old_bounded_arm_reproduces_the_model_defaults_before_issue_14():
    """Every model key a step of the old default reads is pinned to its old value, whatever the
    defaults are now; a key added to the model section must be placed in one of the lists above."""
    import dataclasses

    from pipeline.config import load_config

    model = load_config(None, list(stability.OLD_BOUNDED)).model
    for field in dataclasses.fields(model):
        key, value = field.name, getattr(model, field.name)
        if key in OLD_DEFAULTS:
            assert value == OLD_DEFAULTS[key], key
        elif key in NEW_KEYS_OLD_VALUE:
            assert value == NEW_KEYS_OLD_VALUE[key], key
        else:
            assert key in UNREAD, f"model.{key} is new: does the old bounded arm need it pinned?"
    glow = load_config(None, list(stability.GLOW)).model
    assert (glow.coupling, glow.conv, glow.actnorm, glow.spectral_norm) == (
        "affine_exp",
        "lu",
        "unbounded",
        False,
    )
    assert glow.prior_log_std_bound == 0.0  # Glow's split prior, unbounded


def test_aggregate_rates_with_wilson_intervals_and_averages_only_finished_runs():
    nonfinite = {"non_finite_loss": 3, "non_finite_grad": 3}
    rows = stability.aggregate(
        [
            result("glow", 0.01, 0, "finished", 2.0, {"loss_spike": 2}, rollbacks=1, skipped=1),
            result("bounded", 0.01, 0, "finished", 2.1),
            result("glow", 0.01, 1, "finished_damaged", 2.2),  # finished: counted, and flagged
            result("bounded", 0.01, 1, "crashed", steps=120),
            result("glow", 0.01, 2, "diverged", None, nonfinite, rollbacks=3, skipped=4, steps=30),
            result("bounded", 0.01, 2, "finished", math.nan),  # finished, but no usable bpd
            result("bounded", 0.01, 3, "incomplete"),  # still running on a cluster: not counted
            result("glow", 0.01, 0, "diverged", steps=9, clip=False),
            result("glow", 0.01, 1, "diverged", steps=20, clip=False),
            result("glow", 0.01, 2, "diverged", steps=40, clip=False),
            result("glow", 0.01, 0, "finished", 2.5, precision="bf16"),
        ]
    )
    keys = [(r["arm"], r["lr"], r["clip"], r["precision"]) for r in rows]
    assert keys == [
        ("glow", 0.01, True, "fp32"),
        ("bounded", 0.01, True, "fp32"),
        ("glow", 0.01, False, "fp32"),
        ("glow", 0.01, True, "bf16"),
    ]
    glow, bounded, noclip, bf16 = rows
    assert set(glow) == set(stability.TABLE_COLUMNS)
    lo, hi = stability.wilson(1, 3)
    assert glow == {
        "arm": "glow",
        "lr": 0.01,
        "clip": True,
        "precision": "fp32",
        "runs": 3,
        "finished": 2,
        "finished damaged": 1,
        "diverged": 1,
        "crashed": 0,
        "divergence rate": pytest.approx(1 / 3),
        "rate lo": pytest.approx(lo),
        "rate hi": pytest.approx(hi),
        "median steps to divergence": 30,
        "median first event step": None,  # no events.jsonl, no last_events
        "runs with events": 2,
        "runs rolled back": 2,
        "events": 8,
        "rollbacks": 4,
        "skipped steps": 5,
        "val bpd mean": pytest.approx(2.1),
        "val bpd std": pytest.approx(math.sqrt(0.02)),  # sample std of 2.0 and 2.2
        "val bpd n": 2,
    }
    # A crashed run is neither finished nor diverged: 0 of 2, not 0 of 3.
    assert (bounded["runs"], bounded["finished"], bounded["crashed"]) == (3, 2, 1)
    assert bounded["divergence rate"] == 0 and bounded["rate hi"] == pytest.approx(0.6576, 1e-3)
    assert bounded["val bpd mean"] == pytest.approx(2.1) and bounded["val bpd n"] == 1
    assert bounded["val bpd std"] is None and bounded["events"] == 0
    assert noclip["divergence rate"] == 1 and noclip["rate lo"] == pytest.approx(0.4385, abs=1e-4)
    assert noclip["median steps to divergence"] == 20 and noclip["val bpd n"] == 0
    assert bf16["val bpd mean"] == 2.5 and bf16["median steps to divergence"] is None


def test_first_event_step_from_events_file_else_the_summarys_last_events(tmp_path):
    (tmp_path / "events.jsonl").write_text(
        '{"step": 17, "kind": "loss_spike"}\n{"step": 12, "kind": "non_finite_loss"}\n{"cut'
    )
    assert stability.first_event_step({"run_dir": str(tmp_path)}) == 12
    last = [{"step": 30, "kind": "non_finite_loss"}, {"step": 28, "kind": "non_finite_grad"}]
    assert stability.first_event_step({"run_dir": str(tmp_path / "x"), "last_events": last}) == 28
    assert stability.first_event_step({"status": "finished"}) is None


def battery(finite=1.0, recon=1e-14, t2=0.0, grad=1e-7) -> dict:
    return {
        **{f"battery/{f}/finite_frac": 1.0 for f in stability.OOD},
        "battery/noise_3x/finite_frac": finite,
        "battery/noise_3x/recon_error": recon,
        "battery/sample_T1.5/nonfinite_frac": 0.0,
        "battery/sample_T2/nonfinite_frac": t2,
        "battery/sample_T2/max_abs": 1e300 if t2 else 2.0,
        "battery/invertible_grad_rel_error": grad,
    }


def test_aggregate_battery_per_arm_and_kind_of_checkpoint():
    rows = stability.aggregate_battery(
        [
            result("glow", 0.01, 0, "finished", 2.0, battery=battery(0.5, 1e-3, 0.5, 1e-2)),
            result("glow", 0.01, 1, "finished", 2.0, battery=battery(1.0, 1e-5, 0.25, 1e-6)),
            result("glow", 0.1, 0, "diverged", battery=battery()),
            result("certified", 0.01, 0, "finished", 2.0, battery=battery()),
            result("certified", 0.01, 1, "finished", 2.0),  # no battery (probe failed): not counted
            result("bounded", 0.1, 0, "crashed", battery=battery()),  # not a result
        ]
    )
    assert [(r["arm"], r["checkpoints"]) for r in rows] == [
        ("glow", "final"),
        ("glow", "last good"),
        ("certified", "final"),
    ]
    glow = rows[0]
    assert set(glow) == set(stability.BATTERY_COLUMNS)
    assert glow["runs probed"] == 2 and glow["runs with non-finite OOD bpd"] == 1
    assert glow["finite bpd noise_3x"] == pytest.approx(0.75)
    assert glow["OOD finite bpd frac"] == pytest.approx((5 + 0.75) / 6)
    assert glow["median recon err noise 3x"] == pytest.approx((1e-3 + 1e-5) / 2)
    assert glow["mean nonfinite samples T2"] == pytest.approx(0.375)
    assert glow["median max abs x T2"] == pytest.approx(1e300)
    assert glow["max grad rel err"] == pytest.approx(1e-2)
    assert rows[2]["runs probed"] == 1 and rows[2]["runs with non-finite OOD bpd"] == 0


def test_aggregate_battery_reads_non_finite_values_as_a_result_file_holds_them():
    """write_json stores NaN and inf as strings; read back, they count as NaN and inf."""
    stored = {
        **battery(),
        "battery/noise_3x/recon_error": "nan",
        "battery/sample_T2/max_abs": "inf",
    }
    (row,) = stability.aggregate_battery([result("glow", 0.1, 0, "finished", 2.0, battery=stored)])
    assert row["median recon err noise 3x"] is None and row["median max abs x T2"] == math.inf


def make_checkpoint(root: Path, step: int, suspect=False, complete=True) -> Path:
    folder = root / f"step{step:08d}"
    folder.mkdir(parents=True)
    (folder / "trainstate.json").write_text(json.dumps({"step": step, "suspect": suspect}))
    if complete:
        (folder / "COMPLETE").write_text("")
    return folder


class ProbingRunner(Runner):
    """A Runner whose probe answers from a table instead of a process."""

    probed: list[list[str]]

    def pipeline_json(self, args, name):
        self.probed.append(args)
        return {"checkpoint": args[2], **battery(recon="inf"), "battery/normal/bpd": "nan"}


def test_a_diverged_run_gets_the_battery_of_its_last_good_checkpoint(tmp_path):
    runner = ProbingRunner(out=tmp_path, config=None)
    runner.probed = []
    spec = RunSpec("glow-lr0.1-clip-seed0", [], {"arm": "glow"})
    root = runner.run_dir(spec.name) / "checkpoints"
    make_checkpoint(root, 0)
    good = make_checkpoint(root, 25)
    make_checkpoint(root, 50, suspect=True)  # saved inside an event window
    make_checkpoint(root, 75, complete=False)  # cut short
    diverged = {"status": "diverged", "steps": 61, "checkpoint": str(root / "step00000050")}

    assert stability.add_battery(runner, spec, diverged, ("--images", "2"))
    assert runner.probed == [["probe", "--checkpoint", str(good), "--json", "--images", "2"]]
    assert diverged["battery_step"] == 25 and diverged["battery_checkpoint"] == str(good)
    assert diverged["battery_source"] == "probe of the last good checkpoint"
    # Non-finite values arrive as json_safe strings and become floats.
    assert diverged["battery"]["battery/noise_3x/recon_error"] == math.inf
    assert math.isnan(diverged["battery"]["battery/normal/bpd"])
    assert "checkpoint" not in diverged["battery"]
    # Once there, the battery is kept: a rerun does not probe again.
    assert not stability.add_battery(runner, spec, diverged, ())
    assert len(runner.probed) == 1


def test_a_finished_run_keeps_the_battery_of_its_summary_else_probes_its_final_checkpoint(tmp_path):
    runner = ProbingRunner(out=tmp_path, config=None)
    runner.probed = []
    spec = RunSpec("certified-lr0.01-clip-seed0", [], {"arm": "certified"})
    final = make_checkpoint(runner.run_dir(spec.name) / "checkpoints", 200)
    summary = {"status": "finished", "steps": 200, "battery": battery(), "checkpoint": str(final)}
    assert stability.add_battery(runner, spec, summary, ())
    assert summary["battery_source"] == "summary" and runner.probed == []

    finished = {"status": "finished", "steps": 200, "checkpoint": str(final)}
    assert stability.add_battery(runner, spec, finished, ())
    assert runner.probed[0][:3] == ["probe", "--checkpoint", str(final)]
    assert finished["battery_step"] == 200

    for status in ("crashed", "failed", "preempted"):  # no battery: not a result of the study
        assert not stability.add_battery(runner, spec, {"status": status}, ())
    nothing = {"status": "diverged", "steps": 3}  # no checkpoint at all
    assert stability.add_battery(runner, RunSpec("glow-lr1-clip-seed0", []), nothing, ())
    assert "no checkpoint" in nothing["battery_error"] and "battery" not in nothing


def test_run_all_keeps_jobs_processes_going_each_on_its_own_port(tmp_path, monkeypatch):
    import threading
    import time

    monkeypatch.setenv("MASTER_PORT", "29950")
    runner = Runner(out=tmp_path, config=None)
    specs = [RunSpec(f"r{i}", []) for i in range(7)]
    running, peak, lock, seen = set(), [0], threading.Lock(), []

    def work(spec, slot):
        with lock:
            assert slot not in running  # a slot (and its port) is never shared
            running.add(slot)
            peak[0] = max(peak[0], len(running))
            seen.append((spec.name, runner.slot_env(slot).get("MASTER_PORT")))
        time.sleep(0.05)
        with lock:
            running.discard(slot)
        return spec.name

    done = list(runner.run_all(specs, work, jobs=2))
    assert sorted(i for i, _ in done) == list(range(7)) and all(specs[i].name == n for i, n in done)
    assert peak[0] == 2 and {port for _, port in seen} == {None, "29951"}  # None: MASTER_PORT
    assert [i for i, _ in runner.run_all(specs, work, jobs=1)] == list(range(7))


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


# The two arms whose model overrides only the stability study trains (the certified arm is the
# model defaults every other training test runs).
STABILITY_ARMS = ("glow", "bounded")


@pytest.fixture(scope="module")
def quick_studies(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Both quick studies, started together: the stability study's 4 runs two at a time (each its
    own port: 29931, 29932) beside the optimum study's one at a time keep both cores busy, where
    one after the other left a core idle most of the optimum study. {name: (out, its process)}."""
    root = tmp_path_factory.mktemp("studies")
    outs = {"stability": root / "stability", "optimum": root / "optimum"}
    stability_args = ["--quick", "--arms", *STABILITY_ARMS, "--jobs", "2"]
    done = run_together(
        {
            "stability": study_command(
                "stability", *stability_args, "--out", str(outs["stability"]), port="29931"
            ),
            "optimum": study_command(
                "optimum", "--quick", "--out", str(outs["optimum"]), port="29934"
            ),
        }
    )
    return {name: (out, done[name]) for name, out in outs.items()}


@pytest.mark.slow
def test_stability_study_quick_records_divergence_battery_and_resumes(quick_studies, capsys):
    out, first = quick_studies["stability"]
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    arms = STABILITY_ARMS
    quick = ["stability", "--quick", "--arms", *arms, "--out", str(out)]

    columns, rows = read_csv(out / "stability.csv")
    assert columns == stability.TABLE_COLUMNS
    by_key = {(r["arm"], float(r["lr"]), r["clip"]): r for r in rows}
    assert set(by_key) == {(a, lr, c) for a in arms for lr, c in ((1e-3, "True"), (10.0, "False"))}
    for arm in arms:
        calm, wild = by_key[(arm, 1e-3, "True")], by_key[(arm, 10.0, "False")]
        assert (calm["runs"], calm["finished"], calm["diverged"]) == ("1", "1", "0")
        assert float(calm["divergence rate"]) == 0 and float(calm["rate hi"]) == pytest.approx(
            stability.wilson(0, 1)[1]
        )
        assert 0 < float(calm["val bpd mean"]) < 8
        # lr=10 without clipping makes the loss non-finite at once; with no rollbacks allowed the
        # guard stops the run
        assert (wild["runs"], wild["finished"], wild["diverged"]) == ("1", "0", "1")
        assert float(wild["divergence rate"]) == 1 and float(wild["rate lo"]) > 0.2
        assert int(wild["events"]) >= 3 and int(wild["skipped steps"]) >= 3
        assert wild["val bpd mean"] == "" and wild["val bpd n"] == "0"
        assert 0 < float(wild["median steps to divergence"]) < 12
        assert (
            0 < float(wild["median first event step"]) <= float(wild["median steps to divergence"])
        )
        diverged = json.loads((out / "results" / f"{arm}-lr10-noclip-seed0.json").read_text())
        assert diverged["status"] == "diverged" and diverged["returncode"] == 3
        assert diverged["last_events"] and diverged["reason"].startswith("diverged after")
        # The battery of a diverged run comes from its last good checkpoint, not its last one.
        good = Path(diverged["battery_checkpoint"])
        state = json.loads((good / "trainstate.json").read_text())
        assert good.parent == Path(diverged["run_dir"]) / "checkpoints" and not state.get("suspect")
        assert diverged["battery_step"] == state["step"] < diverged["steps"]
        assert diverged["battery"]["battery/val/finite_frac"] == 1.0
        finished = json.loads((out / "results" / f"{arm}-lr0.001-clip-seed0.json").read_text())
        assert (
            finished["battery_step"] == 12
            and "battery/sample_T2/nonfinite_frac" in (finished["battery"])
        )

    columns, battery_rows = read_csv(out / "battery.csv")
    assert columns == stability.BATTERY_COLUMNS
    assert {(r["arm"], r["checkpoints"], r["runs probed"]) for r in battery_rows} == {
        (a, kind, "1") for a in arms for kind in ("final", "last good")
    }
    _, runs = read_csv(out / "runs.csv")
    assert {r["run"]: r["status"] for r in runs} == {
        **{f"{a}-lr0.001-clip-seed0": "finished" for a in arms},
        **{f"{a}-lr10-noclip-seed0": "diverged" for a in arms},
    }
    assert all(r["grad rel err"] != "" for r in runs)
    # All four runs in one MLflow experiment, the compare report and plots beside the tables.
    _, compared = read_csv(out / "compare" / "compare.csv")
    assert sorted(r["run"] for r in compared) == sorted(r["run"] for r in runs)
    assert {r["status"] for r in compared if "lr10" in r["run"]} == {"FAILED"}
    assert (out / "compare" / "bpd.png").stat().st_size > 0
    for plot in ("stability.png", "battery.png", "curves.png"):
        assert (out / plot).stat().st_size > 0
    report = (out / "stability.md").read_text()
    assert "| glow | 10 | no | fp32 | 1 | 1 | 1.00 [0.21, 1.00] |" in report
    assert "![stability](stability.png)" in report and "![battery](battery.png)" in report

    # Rerunning continues the study: nothing is trained or probed again. (The command in this
    # process from here on: it starts no run, and an interpreter costs ~2.5 s.)
    logs = {p.name: p.stat().st_size for p in (out / "logs").glob("*-seed0.log")}
    assert run_main(capsys, "study", *quick).count("(earlier)") == 4
    assert {p.name: p.stat().st_size for p in (out / "logs").glob("*-seed0.log")} == logs
    # --report-only starts nothing and tabulates the same.
    (out / "stability.csv").unlink()
    run_main(capsys, "study", *quick, "--report-only")
    assert read_csv(out / "stability.csv")[1] == rows
    assert main(["study", *quick, "--no-resume"]) == 2
    assert "already holds runs" in capsys.readouterr().err


@pytest.mark.slow
def test_optimum_study_quick_compares_linear_flows_with_the_closed_form(quick_studies):
    out, done = quick_studies["optimum"]
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
