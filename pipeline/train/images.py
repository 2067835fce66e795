"""Image grids from model-space tensors (x in [-1/2, 1/2), docs/design.md §3) without torchvision,
and the pictures a run draws from its model."""

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


def save_panel(rows: list[tuple[str, torch.Tensor]], path: str | Path, scale: int = 3) -> Path:
    """A labelled panel, one titled row of images per (label, batch), each image enlarged
    ``scale``× (nearest neighbour, so pixels stay pixels); written as PNG, atomically."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    pad, title = 4, 14
    strips = [np.repeat(np.repeat(to_uint8(x), scale, axis=1), scale, axis=2) for _, x in rows]
    h, w, c = strips[0].shape[1:]
    cols = max(len(s) for s in strips)
    width = max(pad + cols * (w + pad), 8 * max(len(label) for label, _ in rows))
    height = len(rows) * (title + h + pad) + pad
    panel = np.full((height, width, c), 255, dtype=np.uint8)
    top = pad
    for strip in strips:
        for i, img in enumerate(strip):
            left = pad + i * (w + pad)
            panel[top + title : top + title + h, left : left + w] = img
        top += title + h + pad
    image = Image.fromarray(panel)
    draw = ImageDraw.Draw(image)
    for k, (label, _) in enumerate(rows):
        draw.text((pad, pad + k * (title + h + pad)), label, fill=(0, 0, 0), font=font)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def draw_samples(model, n: int, temperature: float, path: Path) -> Path:
    """A grid of ``n`` samples at ``temperature``."""
    with torch.no_grad():
        return save_grid(model.sample(n, temperature=temperature), path)


PANEL_TEMPERATURES = (0.5, 0.7, 1.0)


def draw_panel(model, x: torch.Tensor, path: Path) -> Path:
    """The end-of-run picture: the images ``x``, their exact reconstructions x -> z -> x (proof of
    invertibility at a glance), and as many samples at each of 0.5, 0.7, 1.0."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x_hat = model.reconstruct(x)
            error = (x_hat - x).abs().max().item()
            generator = torch.Generator(device=x.device).manual_seed(0)
            rows = [
                ("validation images", x),
                (f"their reconstructions x -> z -> x (max |error| {error:.1e})", x_hat),
                *(
                    (
                        f"samples at T = {t}",
                        model.sample(len(x), temperature=t, generator=generator),
                    )
                    for t in PANEL_TEMPERATURES
                ),
            ]
    finally:
        model.train(was_training)
    return save_panel(rows, path)
