"""The experiment opens in MLflow 3's model-training view: it carries mlflow.experimentKind.

An experiment without a kind is shown as a GenAI app (traces, prompts); the sink creates ours with
``custom_model_development`` and tags an existing one that has no kind, keeping a kind someone chose.
The UI's landing page still opens on the GenAI overview, so the end-of-run report links to the
run's page in the model-training view (pipeline/track/ui.py).
"""

from __future__ import annotations

from pipeline.track.sink import MetricsSink
from tests.test_track_sink import sqlite_store, tracking

KIND = "mlflow.experimentKind"


def experiment_tags(uri: str, name: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient(uri).get_experiment_by_name(name).tags)


def one_run(run_dir, cfg) -> str:
    sink = MetricsSink(run_dir, cfg, True, "r")
    sink.log(1, {"train/bpd": 1.0})
    sink.close()
    return sink.run_id


def test_a_new_experiment_is_created_with_the_model_training_kind(tmp_path):
    uri = sqlite_store(tmp_path)
    assert one_run(tmp_path / "a", tracking(experiment="fresh"))
    assert experiment_tags(uri, "fresh")[KIND] == "custom_model_development"


def test_an_untagged_experiment_gets_the_kind_and_a_chosen_kind_stays(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    client.create_experiment("old")  # as runs before this change left it: no kind
    client.create_experiment("genai", tags={KIND: "genai_development"})
    assert KIND not in experiment_tags(uri, "old")

    assert one_run(tmp_path / "a", tracking(experiment="old"))
    assert one_run(tmp_path / "b", tracking(experiment="genai"))
    assert experiment_tags(uri, "old")[KIND] == "custom_model_development"
    assert experiment_tags(uri, "genai")[KIND] == "genai_development"


def test_the_report_links_to_the_run_in_the_model_training_view(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.commands.train import print_summary

    uri = sqlite_store(tmp_path)
    sink = MetricsSink(tmp_path / "a", tracking(), True, "r")
    sink.close()
    experiment_id = MlflowClient(uri).get_experiment_by_name("test").experiment_id
    assert sink.experiment_id == experiment_id
    summary = {
        "status": "finished",
        "final_val_bpd": 1.5,
        "steps": 6,
        "run_dir": str(tmp_path / "a"),
        "samples": None,
        "checkpoint": None,
        "tracking_uri": uri,
        "mlflow_run_id": sink.run_id,
        "mlflow_experiment_id": sink.experiment_id,
    }
    print_summary(summary)
    printed = capsys.readouterr().out
    assert f"ui --backend-store-uri {uri} --port 5000" in printed
    run_page = f"/#/experiments/{experiment_id}/runs/{sink.run_id}?workflowType=machine_learning"
    assert f"the run in the MLflow UI  : http://127.0.0.1:5000{run_page}\n" in printed


def test_a_tracking_server_is_the_ui():
    from pipeline.track.ui import ui_command, ui_link

    assert ui_command("http://mlflow:5001") is None  # nothing to start: the server serves it
    assert (
        ui_link("http://mlflow:5001/", "7", "abc")
        == "http://mlflow:5001/#/experiments/7/runs/abc?workflowType=machine_learning"
    )
    assert (
        ui_link("sqlite:///runs/mlflow.db", "7")
        == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
