"""Stream the images of a shard folder as n-bit levels, for the optimum (no webdataset here).

Shards are the tar files ``<split>-%06d.tar`` written by ``python -m pipeline shards`` (docs/design.md §4),
each sample a ``<key>.png`` (or jpg) member. Reading them with tarfile + PIL keeps pipeline/theory
free of the loader; the quantisation is the loader's (pipeline/data/quantise.py).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.quantise import quantise

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def shard_files(shards: str | Path, split: str = "train") -> list[Path]:
    """The ``<split>-*.tar`` files of a shard folder, in name order; a clear error if there are
    none."""
    root = Path(shards)
    if not root.is_dir():
        raise FileNotFoundError(f"shard folder {root} does not exist")
    files = sorted(root.glob(f"{split}-*.tar"))
    if not files:
        subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.tar")))
        hint = f"; folders with shards inside: {', '.join(subdirs)}" if subdirs else ""
        raise FileNotFoundError(f"no {split}-*.tar shards in {root}{hint}")
    return files


def iter_levels(
    shards: str | Path,
    n_bits: int,
    *,
    split: str = "train",
    batch_size: int = 64,
    limit: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield uint8 batches [B, 3, H, W] of n-bit levels k = v >> (8 - n), at most ``limit``
    images."""
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be in 1..8 for 8-bit images, got {n_bits}")
    batch: list[np.ndarray] = []
    seen = 0
    for path in shard_files(shards, split):
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                data = tar.extractfile(member).read()
                with Image.open(io.BytesIO(data)) as img:
                    v = np.asarray(img.convert("RGB"), dtype=np.uint8)
                batch.append(quantise(v, n_bits))
                seen += 1
                if len(batch) == batch_size:
                    yield _stack(batch)
                    batch = []
                if limit is not None and seen >= limit:
                    break
        if limit is not None and seen >= limit:
            break
    if batch:
        yield _stack(batch)


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes in one shard set: {sorted(shapes)}")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
