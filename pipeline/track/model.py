"""The trained flow as an MLflow model: logged at the end of a finished run and by
``python -m pipeline export --checkpoint RUN --mlflow``, optionally registered.

What is logged under the run's ``model`` (a LoggedModel; ``runs:/<run_id>/model`` loads it):

    weights.pt      plain state dict + resolved config + step (the ``export`` file; loads with
                    ``torch.load(weights_only=True)``)
    python_model    pipeline/track/pyfunc.py, models-from-code: no pickled torch module
    code/pipeline   this package as it was when the model was logged, so a fresh process anywhere
                    imports the code that trained it (torch, numpy, pandas, mlflow pinned)

Tracking never stops training (docs/design.md §6): ``log_final_model`` catches every failure and returns
it as a reason for summary.json, after one warning line. ``export --mlflow`` raises instead: there
the model is what was asked for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pipeline.io import atomic_path

log = logging.getLogger(__name__)

NAME = "model"  # runs:/<run_id>/model
PYFUNC = Path(__file__).with_name("pyfunc.py")
PACKAGE = Path(__file__).resolve().parent.parent  # pipeline/
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas")


def save_weights(model: torch.nn.Module, config: dict, step: int, path: Path) -> Path:
    """The export file: {state_dict, config (the resolved tree as plain data), step}, atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state, "config": config, "step": int(step)}, tmp)
    return Path(path)


def pip_requirements() -> list[str]:
    """The versions this process runs, without local tags (torch 2.x+cpu -> torch==2.x)."""
    return [f"{pkg}=={metadata.version(pkg).split('+')[0]}" for pkg in REQUIREMENTS]


@contextlib.contextmanager
def tracking_uri(uri: str):
    """MLflow's model logging reads the process-wide tracking URI: point it at ``uri`` for the
    duration (no artifact progress bars in a training log), then put back what was there."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    saved, saved_env = utils._tracking_uri, {k: os.environ.get(k) for k in names}
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _NoSignatureNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to infer model signature")


@contextlib.contextmanager
def without_signature_warning():
    """The pyfunc has no signature on purpose (it takes uint8 HWC and float CHW images, which one
    tensor spec cannot describe); MLflow's warning about it would read like a failure."""
    logger, note = logging.getLogger("mlflow.pyfunc"), _NoSignatureNote()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


def log_model(weights: Path, uri: str, run_id: str) -> dict[str, Any]:
    """Log ``weights`` (a ``save_weights`` file) as the pyfunc ``model`` of run ``run_id`` in the
    store ``uri``. Raises on failure. Returns {"mlflow_model": "runs:/<run_id>/model",
    "mlflow_model_id": the LoggedModel's id}."""
    import mlflow
    from mlflow.models import Model

    from pipeline.track.store import open_client

    step = torch.load(weights, map_location="cpu", weights_only=True)["step"]
    client = open_client(uri)
    run = client.get_run(run_id)
    # Created here, in the run's experiment: MLflow would put it in the process's active
    # experiment (Default, artifacts under ./mlruns of the cwd).
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=NAME,
        source_run_id=run_id,
        tags={"lipflow.step": str(step)},
        params=dict(run.data.params),
    )
    with tracking_uri(uri), without_signature_warning():
        info = Model.log(
            artifact_path=None,  # MLflow 3: the model is the LoggedModel above
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            python_model=str(PYFUNC),
            artifacts={"weights": str(weights)},
            code_paths=[str(PACKAGE)],
            pip_requirements=pip_requirements(),
        )
    return {"mlflow_model": f"runs:/{run_id}/{NAME}", "mlflow_model_id": info.model_id}


def register_model(uri: str, model_id: str, name: str) -> str:
    """A new version of registered model ``name`` (created if new) for the logged model;
    returns "NAME/VERSION". Raises on failure."""
    import mlflow

    with tracking_uri(uri):  # the registry defaults to the tracking store (SQLite has one)
        version = mlflow.register_model(f"models:/{model_id}", name)
    return f"{version.name}/{version.version}"


def log_final_model(
    sink, tracking, status: str, model: torch.nn.Module, config: dict, step: int, run_dir: Path
) -> dict[str, Any]:
    """The end-of-run model for summary.json: the weights the loop holds (``model`` at ``step``,
    ``config`` the resolved tree as plain data) logged, and registered, for a finished run whose
    MLflow run exists; a failure is one warning line and a reason (``export --checkpoint
    run_dir --mlflow`` retries from the last checkpoint).

    ``sink``: the run's MetricsSink (its store and run id); ``tracking``: cfg.tracking. Returns
    {"mlflow_model": URI or None, "registered_model": "NAME/VERSION" or None, and
    "mlflow_model_reason" when either is missing for a reason worth saying, or
    "mlflow_model_seconds"}; empty on other ranks.
    """
    if not sink.is_main:
        return {}
    record: dict[str, Any] = {"mlflow_model": None, "registered_model": None}
    reason = None
    if status != "finished":
        reason = f"run {status}: no final model"
    elif not tracking.enabled or not tracking.log_model:
        reason = "tracking.enabled or tracking.log_model is false"
    elif sink.run_id is None:
        reason = f"the MLflow store {sink.uri} was unreachable since the start: no run to log to"
    if reason is not None:
        return {**record, "mlflow_model_reason": reason}
    later = f"`python -m pipeline export --checkpoint {run_dir} --mlflow`"
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="lipflow-model-") as tmp:
            weights = save_weights(model, config, step, Path(tmp) / "weights.pt")
            record.update(log_model(weights, sink.uri, sink.run_id))
        if tracking.register_model:
            record["registered_model"] = register_model(
                sink.uri, record["mlflow_model_id"], tracking.register_model
            )
    except Exception as e:
        step = "registering it" if record["mlflow_model"] else "logging it"
        first_line = (str(e).splitlines() or [""])[0][:300]
        reason = f"{step} failed: {type(e).__name__}: {first_line}"
        log.warning("MLflow model: %s; training is unaffected; %s retries", reason, later)
        record["mlflow_model_reason"] = reason
    record["mlflow_model_seconds"] = round(time.perf_counter() - start, 2)
    return record


def checkpoint_run(folder: Path, run_id: str | None) -> tuple[str, str]:
    """(store URI, MLflow run id) of a checkpoint folder <run>/checkpoints/stepN: the run its folder
    mirrors to (tracking/state.json, else the checkpoint's TrainState), or ``run_id``."""
    from pipeline.config import load_saved_config
    from pipeline.errors import PipelineError
    from pipeline.track.sink import default_uri

    run_dir = folder.parent.parent
    cfg = load_saved_config(folder / "config.yaml")
    uri = cfg.tracking.uri or default_uri(run_dir)
    if run_id is None:
        state = run_dir / "tracking" / "state.json"
        if state.is_file():
            run_id = json.loads(state.read_text()).get("run_id")
        run_id = run_id or json.loads((folder / "trainstate.json").read_text())["mlflow_run_id"]
    if not run_id:
        raise PipelineError(
            f"{run_dir} names no MLflow run (its store was never reached): pass --run-id, or "
            "resume the run once the store is up so that the run is created"
        )
    return uri, run_id
