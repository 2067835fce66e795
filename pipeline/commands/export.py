"""`python -m pipeline export --checkpoint DIR --out model.pt`: a plain state dict + config, no DeepSpeed.

The file loads with ``torch.load(path, weights_only=True)`` and holds ``state_dict`` (tensors),
``config`` (the resolved tree as plain data) and ``step``; rebuild the model with
``pipeline.flows.build_flow(ModelConfig(**config["model"]), (3, r, r), n_bits)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pipeline.config import to_dict
from pipeline.io import atomic_path
from pipeline.train.inference import load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint step folder or run folder")
    p.add_argument("--out", required=True, help="output .pt file")


def run(args: argparse.Namespace) -> int:
    model, cfg, folder = load_model(args.checkpoint)
    step = json.loads((folder / "trainstate.json").read_text())["step"]
    out = Path(args.out)
    with atomic_path(out) as tmp:
        torch.save({"state_dict": model.state_dict(), "config": to_dict(cfg), "step": step}, tmp)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n:,} parameters, step {step}) from {folder}")
    return 0
