"""Image grids from model-space tensors (x in [-1/2, 1/2), DESIGN.md §3) without torchvision."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.io import atomic_path


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1/2, 1/2) -> [B, H, W, C] uint8."""
    x = (x.detach().float().clamp(-0.5, 0.5) + 0.5) * 255.0
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x: torch.Tensor, path: str | Path, pad: int = 2) -> Path:
    """Write a near-square grid of the batch as PNG, atomically."""
    images = to_uint8(x)
    b, h, w, c = images.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top : top + h, left : left + w] = img
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return Path(path)
