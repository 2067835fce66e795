"""A trained flow in MLflow: its model (pyfunc from code, registered) and the data it saw.

The session's tiny run (tests/conftest.py ``tiny_run``: debug.yaml with ``tracking.register_model``)
is the trained flow; the tests read what it left in its SQLite store through MlflowClient, load the
model in a fresh process elsewhere (``runs:/RUN/model``) and compare its predictions with
``evaluate`` and with the flow's own forward, and log a second model with ``export --mlflow``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import PYTHON, REGISTERED_MODEL, env_for_subprocess, run_main

REGISTERED = REGISTERED_MODEL


@pytest.fixture(scope="module")
def trained(tiny_run) -> dict:
    return tiny_run


def client(trained):
    from mlflow.tracking import MlflowClient

    return MlflowClient(trained["uri"])


def in_fresh_process(trained, code: str) -> dict:
    """Run ``code`` in a new interpreter, cwd outside the repository; it prints one JSON line."""
    out = subprocess.run(
        [PYTHON, "-c", textwrap.dedent(code)],
        cwd=trained["root"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env_for_subprocess(MLFLOW_TRACKING_URI=trained["uri"]),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_finished_run_logs_and_registers_its_model(trained):
    summary, run_id = trained["summary"], trained["summary"]["mlflow_run_id"]
    assert summary["mlflow_model"] == f"runs:/{run_id}/model"
    assert summary["registered_model"] == f"{REGISTERED}/1"
    assert "mlflow_model_reason" not in summary
    assert 0 < summary["mlflow_model_seconds"] < 60  # measured 1.4 s on the 2-core machine

    c = client(trained)
    (model,) = c.search_logged_models([c.get_run(run_id).info.experiment_id])
    assert model.model_id == summary["mlflow_model_id"]
    assert model.source_run_id == run_id and model.name == "model"
    assert model.tags["lipflow.step"] == "6"
    assert c.get_registered_model(REGISTERED).name == REGISTERED
    (version,) = c.search_model_versions(f"name = '{REGISTERED}'")
    assert int(version.version) == 1 and model.model_id in version.source


def test_the_model_loads_in_a_fresh_process_and_scores_like_evaluate(trained, capsys):
    run_dir, run_id = trained["run_dir"], trained["summary"]["mlflow_run_id"]
    evaluated = json.loads(
        run_main(capsys, "evaluate", "--checkpoint", str(run_dir), "--json").splitlines()[-1]
    )
    got = in_fresh_process(
        trained,
        f"""
        import json, mlflow, numpy as np, torch
        model = mlflow.pyfunc.load_model("runs:/{run_id}/model")
        import pipeline  # the model put its code first on sys.path
        from pipeline.config import load_config
        from pipeline.data import build_loader, resolve_shards
        cfg = load_config("{run_dir}/config.yaml")
        loader = build_loader(cfg.data, resolve_shards(cfg.data), "val", 32, rank=0, world_size=1)
        x = torch.cat(list(loader)).numpy()  # the images evaluate scores, its dequantisation
        scores = model.predict(x)
        pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
        print(json.dumps({{
            "bpd": scores["bpd"].tolist(),
            "log_likelihood": scores["log_likelihood"].tolist(),
            "uint8_bpd": model.predict(pixels)["bpd"].tolist(),
            "code": pipeline.__file__,
        }}))
        """,
    )
    assert "/code/pipeline/" in got["code"]  # the package logged with the model, not the repo's
    bpd = np.array(got["bpd"])
    assert len(bpd) == evaluated["images"] == 32 and np.isfinite(bpd).all()
    assert abs(bpd.mean() - evaluated["bpd"]) < 1e-4
    dims = 3 * 16 * 16
    np.testing.assert_allclose(got["log_likelihood"], -bpd * dims * np.log(2), rtol=1e-12)

    # uint8 pixels: quantised to n_bits and taken at the bin centre, exactly the flow's forward
    from pipeline.train.inference import load_model

    flow, cfg, _ = load_model(run_dir)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    k = torch.from_numpy(pixels).permute(0, 3, 1, 2).long() >> (8 - cfg.data.n_bits)
    x = (k.float() + 0.5) / 2**cfg.data.n_bits - 0.5
    with torch.no_grad():
        expected = flow(x)["bpd"].double().numpy()
    np.testing.assert_allclose(got["uint8_bpd"], expected, rtol=0, atol=1e-5)


def test_the_weights_file_loads_with_weights_only(trained):
    import mlflow

    c = client(trained)
    model_id = trained["summary"]["mlflow_model_id"]
    where = Path(c.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    blob = torch.load(where / "artifacts" / "weights.pt", weights_only=True)
    assert blob["step"] == 6 and blob["config"]["data"]["resolution"] == 16
    assert (where / "pyfunc.py").is_file()  # the model is this code, run at load
    assert not list(where.rglob("*.pkl"))  # models-from-code: nothing pickled
    assert mlflow.__version__.startswith("3.")


def test_predict_refuses_images_it_cannot_score():
    from pipeline.track.pyfunc import to_inputs

    with pytest.raises(ValueError, match=r"uint8 \[N, 16, 16, 3\]"):
        to_inputs(np.zeros((2, 8, 8, 3), np.uint8), 16, 5)
    with pytest.raises(ValueError, match=r"\[-1/2, 1/2\)"):
        to_inputs(np.ones((2, 3, 16, 16), np.float32), 16, 5)
    one = to_inputs(np.full((16, 16, 3), 255, np.uint8), 16, 5)  # one image, the top bin
    assert one.shape == (1, 3, 16, 16) and torch.allclose(one, torch.tensor(0.5 - 1 / 64))


def test_export_logs_a_model_to_the_existing_run(trained, capsys):
    run_id = trained["summary"]["mlflow_run_id"]
    out = run_main(capsys, "export", "--checkpoint", str(trained["run_dir"]), "--mlflow")
    assert f"runs:/{run_id}/model" in out
    c = client(trained)
    models = c.search_logged_models([c.get_run(run_id).info.experiment_id])
    assert len(models) == 2 and {m.source_run_id for m in models} == {run_id}


def test_a_failed_model_log_is_a_reason_not_an_error(trained, caplog):
    from types import SimpleNamespace

    from pipeline.config import to_dict
    from pipeline.track.config import TrackingConfig
    from pipeline.track.model import log_final_model
    from pipeline.train.inference import load_model

    model, cfg, _ = load_model(trained["run_dir"])
    final = (model, to_dict(cfg), 6, trained["run_dir"])  # what the loop holds at its end
    sink = SimpleNamespace(is_main=True, uri=trained["uri"], run_id="0" * 32)  # no such run
    record = log_final_model(sink, TrackingConfig(), "finished", *final)
    assert record["mlflow_model"] is None and record["registered_model"] is None
    assert record["mlflow_model_reason"].startswith("logging it failed: MlflowException")
    assert "export --checkpoint" in caplog.text and caplog.text.count("MLflow model:") == 1

    down = SimpleNamespace(is_main=True, uri=trained["uri"], run_id=None)
    record = log_final_model(down, TrackingConfig(), "finished", *final)
    assert "unreachable" in record["mlflow_model_reason"]
    assert log_final_model(sink, TrackingConfig(), "diverged", *final)["mlflow_model"] is None
    assert log_final_model(SimpleNamespace(is_main=False), TrackingConfig(), "finished", *final) == {}


# ---- dataset lineage --------------------------------------------------------------------------


def test_the_run_logs_its_train_and_val_shards_as_dataset_inputs(trained):
    import hashlib

    c = client(trained)
    run = c.get_run(trained["summary"]["mlflow_run_id"])
    by_context = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
        for d in run.inputs.dataset_inputs
    }
    assert set(by_context) == {"training", "validation"}
    shards = trained["root"] / "data" / "synthetic-r16-n128-v32-s0" / "16"
    manifest = json.loads((shards / "manifest.json").read_text())
    for split, context, images in (("train", "training", 128), ("val", "validation", 32)):
        dataset = by_context[context]
        assert dataset.name == f"synthetic-r16-n128-v32-s0-{split}"
        lines = "\n".join(f"{r['name']} {r['sha256']}" for r in manifest["shards"][split])
        assert dataset.digest == hashlib.sha256(lines.encode()).hexdigest()[:12]
        assert dataset.source_type == "local"
        assert json.loads(dataset.source) == {"uri": str(shards.resolve())}
        profile = json.loads(dataset.profile)
        assert profile["images"] == images and profile["resolution"] == 16
        assert profile["shards"] == len(manifest["shards"][split])
        assert '"shape": [-1, 16, 16, 3]' in dataset.schema


def test_runs_on_other_data_are_told_apart_by_compare(trained, tmp_path):
    from pipeline.__main__ import main
    from pipeline.config import load_config, save_config
    from pipeline.data import prepare_synthetic, resolve_shards
    from pipeline.track.sink import MetricsSink

    runs = trained["root"] / "runs"
    cfg = load_config(
        trained["run_dir"] / "config.yaml", ["run.name=fewer", "data.synthetic_train=64"]
    )
    prepare_synthetic(cfg.data)
    save_config(cfg, cfg.run.dir / "config.yaml")
    for _ in range(2):  # a resume logs its inputs again: MLflow keeps one per dataset
        shards = resolve_shards(cfg.data)  # the run's assembly passes its shard folder in
        sink = MetricsSink(cfg.run.dir, cfg.tracking, True, "fewer", shards=shards)
        sink.log(1, {"train/bpd": 5.0})
        sink.close()
    assert len(client(trained).get_run(sink.run_id).inputs.dataset_inputs) == 2

    out = tmp_path / "cmp"
    assert main(["compare", "--run-root", str(runs), "--out", str(out)]) == 0
    with open(out / "compare.csv", newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    tiny, fewer = rows["tiny"]["train data"], rows["fewer"]["train data"]
    assert tiny.startswith("synthetic-r16-n128-v32-s0-train (")
    assert fewer.startswith("synthetic-r16-n64-v32-s0-train (") and tiny[-14:] != fewer[-14:]
