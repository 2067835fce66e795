"""Checkpoints without DeepSpeed: load a model for sampling, evaluation and export.

Every file is read with ``torch.load(weights_only=True)``: loading a checkpoint never runs code from it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from pipeline.config import Config, describe_model, load_saved_config
from pipeline.flows import build_flow
from pipeline.train import checkpoint as ckpt


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder, or a run folder / checkpoints folder (-> its latest complete step)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / ckpt.COMPLETE).is_file():
        mismatch = ckpt.first_mismatch(path)  # a run folder's latest is verified by find_latest
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


def open_checkpoint(
    path: str | Path, stage: Callable[[str], AbstractContextManager] = nullcontext
) -> tuple[Path, Config]:
    """(step folder, its resolved config) of a checkpoint or run folder, verified."""
    with stage(f"checking checkpoint {path}"):
        folder = resolve_checkpoint(path)
        return folder, load_saved_config(folder / "config.yaml")


def restore_model(
    folder: Path,
    cfg: Config,
    device: str = "cpu",
    stage: Callable[[str], AbstractContextManager] = nullcontext,
) -> torch.nn.Module:
    """The flow of `open_checkpoint`'s (folder, cfg) with its weights, in eval mode."""
    r = cfg.data.resolution
    with stage(f"building the model of {folder} ({describe_model(cfg)})"):
        model = build_flow(cfg.model, (3, r, r), cfg.data.n_bits)
    with stage("loading its weights"):
        model.load_state_dict(load_state_dict(folder))
    return model.to(device).eval()


def load_model(
    path: str | Path,
    device: str = "cpu",
    stage: Callable[[str], AbstractContextManager] = nullcontext,
) -> tuple[torch.nn.Module, Config, Path]:
    """(flow in eval mode, its resolved config, the step folder) from a checkpoint or run folder.
    `stage(description)` wraps each step: commands pass progress.stage, since checking, building
    and loading a 1024² model take half a minute on a CPU."""
    folder, cfg = open_checkpoint(path, stage)
    return restore_model(folder, cfg, device, stage), cfg, folder
