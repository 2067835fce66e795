"""The trained flow as an MLflow pyfunc, written as models-from-code (``mlflow.models.set_model``).

MLflow runs this file when the model is logged (pipeline/track/model.py) and again when it is
loaded; nothing is pickled. ``load_context`` rebuilds the flow from the resolved config stored with
the weights (``pipeline.flows.build_flow``) and loads the state dict with
``torch.load(weights_only=True)``, so loading a model never runs code from its files. The file
needs only torch, numpy, pandas, mlflow, ``pipeline.flows`` and ``pipeline.data.quantise`` (logged
with the model as code).

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    scores = model.predict(images)      # pandas DataFrame, one row per image

Accepted ``images`` (numpy array, torch tensor, nested list, or a DataFrame of them):

    uint8 [N, H, W, 3]          RGB pixels as decoded from a PNG. Quantised to the model's n_bits
                                and dequantised at the bin centre, x = (k + 1/2)/2^n - 1/2: the
                                same map as training's x = (k + u)/2^n - 1/2 with u fixed at 1/2,
                                so ``predict`` is deterministic (evaluate draws u ~ U[0, 1)).
    float [N, 3, H, W]          model inputs already in [-1/2, 1/2) (e.g. a loader's batch),
                                scored as they are: equal to the flow's own forward.

A single image (3 dimensions) counts as N = 1; H = W = the training resolution. A DataFrame holds
one image per row: either one column of arrays as above, or H·W·3 uint8 columns in H, W, C order.
Output columns, per image: ``bpd`` (bits per dimension, as training and ``evaluate`` report it)
and ``log_likelihood`` = -bpd · D · ln 2 nats, D = 3·H·W: log P of the n-bit image under the
dequantised density (a point estimate of the variational lower bound).
"""

from __future__ import annotations

import math
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from pipeline.data.quantise import dequantise, quantise
from pipeline.flows import ModelConfig, build_flow


def load_weights(path: str) -> tuple[torch.nn.Module, int, int]:
    """(flow in eval mode, resolution, n_bits) from a file written by ``model.save_weights``."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    config = blob["config"]
    resolution, n_bits = int(config["data"]["resolution"]), int(config["data"]["n_bits"])
    flow = build_flow(ModelConfig(**config["model"]), (3, resolution, resolution), n_bits)
    flow.load_state_dict(blob["state_dict"])
    return flow.eval(), resolution, n_bits


def as_array(images: Any, resolution: int) -> np.ndarray:
    """Any accepted container -> one numpy array, [N, H, W, 3] or [N, 3, H, W]."""
    import pandas as pd

    if isinstance(images, pd.DataFrame):
        if images.shape[1] == 1:  # one column of per-image arrays
            images = np.stack([np.asarray(v) for v in images.iloc[:, 0]])
        else:  # flattened uint8 rows
            images = images.to_numpy().reshape(len(images), resolution, resolution, 3)
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    return images[None] if images.ndim == 3 else images


def to_inputs(images: Any, resolution: int, n_bits: int) -> torch.Tensor:
    """The flow's float32 input [N, 3, H, W] in [-1/2, 1/2) (see the module docstring)."""
    a = as_array(images, resolution)
    hwc, chw = (resolution, resolution, 3), (3, resolution, resolution)
    if a.ndim == 4 and a.dtype == np.uint8 and a.shape[1:] == hwc:
        k = quantise(np.ascontiguousarray(a.transpose(0, 3, 1, 2)), n_bits)
        return torch.from_numpy(dequantise(k.astype(np.float32), n_bits, 0.5))
    if a.ndim == 4 and np.issubdtype(a.dtype, np.floating) and a.shape[1:] == chw:
        if a.size and not (a.min() >= -0.5 and a.max() < 0.5):
            raise ValueError(
                f"float images must lie in [-1/2, 1/2); got [{a.min():.4g}, {a.max():.4g}]: pass "
                "uint8 pixels [N, H, W, 3] instead, or shift them as the loader does"
            )
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    raise ValueError(
        f"images of dtype {a.dtype} and shape {list(a.shape)}: expected uint8 [N, {resolution}, "
        f"{resolution}, 3] or float [N, 3, {resolution}, {resolution}] in [-1/2, 1/2)"
    )


@torch.no_grad()
def score(flow: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> dict[str, np.ndarray]:
    """Per-image bpd and log-likelihood (nats) of model inputs ``x`` [N, 3, H, W]."""
    bpd = torch.cat([flow(x[i : i + batch])["bpd"].double() for i in range(0, len(x), batch)])
    dims = x[0].numel()
    bpd = bpd.numpy() if len(x) else np.zeros(0)
    return {"bpd": bpd, "log_likelihood": -bpd * dims * math.log(2.0)}


class FlowModel(PythonModel):
    """images -> per-image bpd and log-likelihood; the weights artifact is ``weights``."""

    def load_context(self, context) -> None:
        self.flow, self.resolution, self.n_bits = load_weights(context.artifacts["weights"])

    def predict(self, context, model_input: np.ndarray, params=None):  # DataFrames too
        import pandas as pd

        x = to_inputs(model_input, self.resolution, self.n_bits)
        return pd.DataFrame(score(self.flow, x))


mlflow.models.set_model(FlowModel())
