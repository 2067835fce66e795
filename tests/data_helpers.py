"""Helpers for the data tests: real WebDataset shard sets whose samples a batch can name."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline.data.config import DataConfig
from pipeline.data.images import encode_png
from pipeline.data.manifest import FORMAT, finish_folder, sha256_file


def index_image(i: int, resolution: int) -> np.ndarray:
    """A flat image whose colour spells its index, immune to flips: (i mod 256, i div 256, 200)."""
    return np.broadcast_to(
        np.array([i % 256, i // 256, 200], dtype=np.uint8), (resolution, resolution, 3)
    ).copy()


def batch_ids(batch: torch.Tensor) -> list[int]:
    """Indices of index_image samples in an 8-bit loader batch: k = floor((x + 1/2) · 256)."""
    k = torch.floor((batch.double() + 0.5) * 256).to(torch.int64)
    r = k[:, 0].flatten(1).median(dim=1).values
    g = k[:, 1].flatten(1).median(dim=1).values
    return (r + 256 * g).tolist()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with open(path, "wb") as f, wds.TarWriter(f, user="", group="", mtime=0, encoder=False) as tw:
        for key, members in samples:
            tw.write({"__key__": key, **members})


def write_set(
    out: Path,
    resolution: int,
    train_sizes: list[int],
    val_sizes: list[int],
    image=index_image,
) -> Path:
    """Shard set with the given samples per shard; sample i (counted over train then val) is
    ``image(i, resolution)`` under key ``s<i>``. Returns the folder holding manifest.json."""
    out.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[dict]] = {}
    i = 0
    for split, sizes in (("train", train_sizes), ("val", val_sizes)):
        shards[split] = []
        for s, size in enumerate(sizes):
            name = f"{split}-{s:06d}.tar"
            samples = []
            for _ in range(size):
                samples.append((f"s{i:05d}", {"png": encode_png(image(i, resolution))}))
                i += 1
            write_tar(out / name, samples)
            shards[split].append({"name": name, "count": size, "sha256": sha256_file(out / name)})
    finish_folder(
        out,
        {
            "format": FORMAT,
            "resolution": resolution,
            "image_format": "png",
            "counts": {k: sum(r["count"] for r in v) for k, v in shards.items()},
            "source": {"kind": "test"},
            "split_rule": "test",
            "skipped": {},
            "converted": {},
            "shards": shards,
        },
    )
    return out


def data_cfg(**kw) -> DataConfig:
    base = dict(resolution=8, n_bits=8, hflip=False, workers=0, shuffle_buffer=16, seed=3)
    base.update(kw)
    return DataConfig(**base)


def save_image(path: Path, array: np.ndarray, mode: str | None = None, **save_kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    img.save(path, **save_kw)


def png_bytes_of(path: Path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))


def record_digests(folder: Path) -> None:
    """Rewrite the manifest's sha256 of every shard to the bytes now on disk: a set written with
    bad members, as opposed to one damaged after it was written."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    for records in manifest["shards"].values():
        for r in records:
            r["sha256"] = sha256_file(folder / r["name"])
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
