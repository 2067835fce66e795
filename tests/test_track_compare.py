"""`python -m pipeline compare` on runs written by the sink into a SQLite store."""

from __future__ import annotations

import csv
import math

import pytest

from pipeline.__main__ import main
from pipeline.track.compare import event_marks, load_runs
from pipeline.track.sink import MetricsSink
from tests.test_track_sink import sqlite_store, tracking

COMMON = {"data.n_bits": 5, "train.steps": 30, "run.world_size": 1}


def diagnostics(step: int, lr: float) -> dict[str, float]:
    """The docs/design.md §6 diagnostics with values that depend on the step and the run."""
    return {
        "balance/level0/logdet": -1.0 + step * lr,
        "balance/level1/logdet": 0.5 - step * lr,
        "balance/expansion": 2.0 + step * lr,
        "balance/contraction": 1.0 + step * lr,
        "optim/grad_norm": 10.0 / step,
        "optim/grad_norm/level0": 6.0 / step,
        "optim/grad_norm/level1": 4.0 / step,
        "lipschitz/forward_bound": 8.0,
        "lipschitz/inverse_bound": 9.0,
        "lipschitz/forward_est": 2.0 + step / 30,
        "lipschitz/inverse_est": 3.0 + step / 30,
        "stability/inverse_error": 1e-6 * step,
        "theory/optimum_bpd": 1.25,
        "theory/gap_bpd": 4.0 - step * lr * 10 - 1.25,
    }


def make_run(root, name: str, lr: float, width: int, with_diagnostics: bool, events=()) -> str:
    """Steps 1..30 logged the way the loop does: each event when it happens, with the guard's
    tally, and the running counts in every row (logged every 2 steps); val/bpd every 10 steps; a
    rollback with the first non-finite gradient."""
    sink = MetricsSink(root / name, tracking(), True, name)
    sink.log_params({**COMMON, "train.lr": lr, "model.width": width, "run.name": name})
    counts: dict[str, int] = {}
    rollbacks = 0
    for step in range(1, 31):
        for kind, at in events:
            if at == step:
                counts[kind] = counts.get(kind, 0) + 1
                sink.log_event({"kind": kind, "step": step, "value": 1.0}, counts)
                rollbacks += kind == "non_finite_grad"
        if step % 2 == 1:  # log_every=2: events at even steps fall between log rows
            continue
        metrics = {
            "train/bpd": 4.0 - step * lr * 10,
            "speed/images_per_s": 100.0 + step,
        }
        if with_diagnostics:
            metrics.update(diagnostics(step, lr))
            metrics.update({f"events/{k}": float(n) for k, n in counts.items()})
            metrics.update({"guard/rollbacks": float(rollbacks), "guard/skipped": 2.0 * rollbacks})
        sink.log(step, metrics)
        if step % 10 == 0:
            sink.log(step, {"val/bpd": 4.2 - step * lr * 10 + (0.3 if step == 30 else 0.0)})
    sink.close()
    return sink.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three runs: two with diagnostics (one with events and a rollback), one without any."""
    root = tmp_path_factory.mktemp("compare") / "runs"
    uri = sqlite_store(root)
    ids = {
        "spiky": make_run(
            root,
            "spiky",
            3e-3,
            16,
            True,
            [("loss_spike", 12), ("non_finite_grad", 15), ("loss_spike", 20), ("loss_spike", 23)],
        ),
        "calm": make_run(root, "calm", 1e-3, 16, True),
        "plain": make_run(root, "plain", 1e-3, 32, False),
    }
    return root, uri, ids


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_compare_an_experiment_table_and_plots(store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    root, uri, ids = store
    out = tmp_path / "cmp"
    # No --tracking-uri: the store is found as <run root>/mlflow.db, where training puts it.
    assert (
        main(["compare", "--run-root", str(root), "--experiment", "test", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    rows = read_csv(out / "compare.csv")
    assert [r["run"] for r in rows] == ["spiky", "calm", "plain"]
    assert [r["run_id"] for r in rows] == [ids[n][:8] for n in ("spiky", "calm", "plain")]
    columns = list(rows[0])
    # Only differing params are columns; the common ones are left out.
    assert {"train.lr", "model.width", "run.name"} <= set(columns)
    assert not set(COMMON) & set(columns)
    assert [r["train.lr"] for r in rows] == ["0.003", "0.001", "0.001"]
    assert [r["model.width"] for r in rows] == ["16", "16", "32"]
    by = {r["run"]: r for r in rows}
    assert all(r["steps"] == "30" and r["status"] == "FINISHED" for r in rows)
    assert math.isclose(float(by["spiky"]["final train/bpd"]), 4.0 - 30 * 3e-3 * 10)
    assert math.isclose(float(by["calm"]["final train/bpd"]), 4.0 - 30 * 1e-3 * 10)
    # Best val/bpd is the minimum (step 20), not the last (step 30 got worse).
    assert math.isclose(float(by["calm"]["best val/bpd"]), 4.2 - 20 * 1e-3 * 10)
    assert math.isclose(float(by["spiky"]["gap bpd"]), 4.0 - 30 * 3e-3 * 10 - 1.25)
    assert by["spiky"]["optimum bpd"] == "1.25" and by["plain"]["gap bpd"] == ""
    assert (by["spiky"]["events loss_spike"], by["spiky"]["events non_finite_grad"]) == ("3", "1")
    assert by["calm"]["events loss_spike"] == "0" and by["plain"]["events non_finite_grad"] == "0"
    assert [r["rollbacks"] for r in rows] == ["1", "0", "0"]
    assert [r["skipped steps"] for r in rows] == ["2", "0", "0"]
    assert math.isclose(float(by["plain"]["images/s"]), 116.0)  # mean over steps 2, 4, ..., 30

    markdown = (out / "compare.md").read_text()
    assert markdown in printed
    # the store in a browser: the command serving it, the experiment's runs in the training view
    experiment_id = MlflowClient(uri).get_experiment_by_name("test").experiment_id
    assert f"ui --backend-store-uri {uri} --port 5000" in printed
    runs_view = f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType="
    assert f"the runs in the MLflow UI: {runs_view}machine_learning\n" in printed
    assert markdown.splitlines()[0].startswith("| run | run_id | status |")
    assert len(markdown.splitlines()) == 2 + 3
    for name in ("bpd.png", "balance.png", "grad_norms.png", "lipschitz.png"):
        png = out / name
        assert png.stat().st_size > 20_000, name
        image = Image.open(png).convert("RGB")
        assert image.width > 500 and len(image.getcolors(1 << 20)) > 50, name  # not blank


def test_compare_chosen_runs_without_diagnostics(store, tmp_path, capsys):
    """Run ids pick the runs; params are compared among those only; missing plots are skipped."""
    _, uri, ids = store
    out = tmp_path / "cmp"
    assert (
        main(["compare", ids["calm"], ids["plain"], "--tracking-uri", uri, "--out", str(out)]) == 0
    )
    rows = read_csv(out / "compare.csv")
    assert [r["run"] for r in rows] == ["calm", "plain"]
    assert "train.lr" not in rows[0] and "model.width" in rows[0]  # equal lr among these two
    assert not [c for c in rows[0] if c.startswith("events ")]

    out_plain = tmp_path / "plain"
    assert main(["compare", ids["plain"], "--tracking-uri", uri, "--out", str(out_plain)]) == 0
    printed = capsys.readouterr().out
    assert (out_plain / "bpd.png").stat().st_size > 10_000
    assert sorted(p.name for p in out_plain.glob("*.png")) == ["bpd.png"]
    assert "skipped lipschitz.png" in printed and "skipped balance.png" in printed


def test_event_marks_are_what_the_plots_draw(store):
    _, uri, ids = store
    (spiky,) = load_runs(uri, [ids["spiky"]], "test")
    # Rises only: the counts repeated in every log row mark nothing; the rollback is seen at the
    # first log row after it (step 16), which is where guard/rollbacks is logged.
    assert event_marks(spiky) == [
        (12, "loss_spike"),
        (15, "non_finite_grad"),
        (16, "rollback"),
        (20, "loss_spike"),
        (23, "loss_spike"),
    ]


def test_compare_explains_a_missing_store_or_experiment(store, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = str(tmp_path / "cmp")
    assert main(["compare", "--run-root", str(tmp_path / "nowhere"), "--out", out]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    _, uri, _ = store
    assert main(["compare", "--tracking-uri", uri, "--experiment", "nope", "--out", out]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


def test_bpd_axis_holds_the_healthy_curves_and_not_the_spike():
    from pipeline.track.compare import ComparedRun, bpd_range

    calm = ComparedRun("a" * 32, "calm", "FINISHED", {}, {})
    calm.history["train/bpd"] = [(s, 6.0 - s / 10) for s in range(1, 31)]
    calm.history["theory/optimum_bpd"] = [(0, 2.5)]
    spiky = ComparedRun("b" * 32, "spiky", "FINISHED", {}, {})
    spiky.history["train/bpd"] = [(1, 5.5), (2, 1e3), (3, float("nan")), (4, 4.0)]
    low, high = bpd_range([calm, spiky])
    # from the optimum (below every curve) to the highest first value (6 - 1/10) plus half the way
    # down to the optimum; 1e3 and NaN are off the chart; padded 4% both ways
    top = 5.9 + 0.5 * (5.9 - 2.5)
    pad = 0.04 * (top - 2.5)
    assert math.isclose(low, 2.5 - pad) and math.isclose(high, top + pad)
    calm.history["train/bpd"].append((31, 6.5))  # a healthy curve that creeps up stays in view
    assert bpd_range([calm])[1] == pytest.approx(6.5 + 0.04 * 4.0)
    assert bpd_range([calm, spiky], top=10.0)[1] == pytest.approx(10.0 + 0.04 * 7.5)
    assert bpd_range([ComparedRun("c" * 32, "empty", "RUNNING", {}, {})]) is None
