"""The experiment opens in MLflow 3's model-training view: it carries mlflow.experimentKind.

An experiment without a kind is shown as a GenAI app (traces, prompts); the sink creates ours with
``custom_model_development`` and tags an existing one that has no kind, keeping a kind someone chose.
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
