"""Checkpoints without DeepSpeed: load a model for sampling, evaluation and export.

Every file is read with ``torch.load(weights_only=True)``: loading a checkpoint never runs code from it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import Config, load_saved_config
from pipeline.flows import build_flow
from pipeline.train import checkpoint as ckpt


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder, or a run folder / checkpoints folder (-> its latest complete step)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / ckpt.COMPLETE).is_file():
        mismatch = ckpt.verify(path)  # a run folder's latest is verified by find_latest
        if mismatch is not None:
            raise ckpt.CheckpointError(
                f"checkpoint {path} is damaged ({mismatch}); give its run folder to use the newest "
                "intact checkpoint, or another step folder"
            )
        return path
    for root in (path / "checkpoints", path):
        found = ckpt.find_latest(root)
        if found is not None:
            return found
    raise FileNotFoundError(
        f"no complete checkpoint in {path}: give a run folder or a checkpoints/stepNNNNNNNN folder "
        "holding a COMPLETE marker"
    )


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The module weights of a DeepSpeed checkpoint folder (any ZeRO stage: weights are replicated)."""
    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(
            f"{folder} holds no mp_rank_*_model_states.pt: not a DeepSpeed checkpoint"
        )
    return torch.load(files[0], map_location="cpu", weights_only=True)["module"]


def load_model(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Config, Path]:
    """(flow in eval mode, its resolved config, the step folder) from a checkpoint or run folder."""
    folder = resolve_checkpoint(path)
    cfg = load_saved_config(folder / "config.yaml")
    r = cfg.data.resolution
    model = build_flow(cfg.model, (3, r, r), cfg.data.n_bits)
    model.load_state_dict(load_state_dict(folder))
    return model.to(device).eval(), cfg, folder
