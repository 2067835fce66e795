"""`python -m pipeline export --checkpoint DIR (--out model.pt | --mlflow)`: the model without DeepSpeed.

``--out``: a plain state dict + config. The file loads with ``torch.load(path, weights_only=True)``
and holds ``state_dict`` (tensors), ``config`` (the resolved tree as plain data) and ``step``;
rebuild the model with ``pipeline.flows.build_flow(ModelConfig(**config["model"]), (3, r, r),
n_bits)``.

``--mlflow``: the same weights logged as the MLflow model ``runs:/<run_id>/model`` of the run the
checkpoint's run folder mirrors to (tracking/state.json; ``--run-id`` for another), in that run's
store (tracking.uri, else the SQLite file of its run root): how a run whose store was down at the
end gets its model. ``--register NAME`` also adds a version of registered model NAME.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from pipeline.config import to_dict
from pipeline.errors import PipelineError
from pipeline.track.model import checkpoint_run, log_model, register_model, save_weights
from pipeline.train.inference import load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint step folder or run folder")
    p.add_argument("--out", help="output .pt file")
    p.add_argument("--mlflow", action="store_true", help="log the model to the run's MLflow run")
    p.add_argument("--run-id", help="with --mlflow: this MLflow run instead of the folder's")
    p.add_argument("--register", default="", help="with --mlflow: register it under this name")


def run(args: argparse.Namespace) -> int:
    if not args.out and not args.mlflow:
        raise PipelineError("export needs --out FILE, --mlflow, or both")
    model, cfg, folder = load_model(args.checkpoint)
    step = json.loads((folder / "trainstate.json").read_text())["step"]
    if args.out:
        save_weights(model, to_dict(cfg), step, Path(args.out))
        n = sum(p.numel() for p in model.parameters())
        print(f"wrote {args.out} ({n:,} parameters, step {step}) from {folder}")
    if args.mlflow:
        uri, run_id = checkpoint_run(folder, args.run_id)
        with tempfile.TemporaryDirectory(prefix="lipflow-model-") as tmp:
            weights = save_weights(model, to_dict(cfg), step, Path(tmp) / "weights.pt")
            record = log_model(weights, uri, run_id)
        print(f"logged {record['mlflow_model']} ({record['mlflow_model_id']}) in {uri}")
        if args.register:
            print(f"registered {register_model(uri, record['mlflow_model_id'], args.register)}")
    return 0
