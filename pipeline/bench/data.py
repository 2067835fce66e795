"""Data loader throughput: `python -m pipeline bench data [--n 1024 --resolution 64 --workers 2]`.

Prints JSON with images/s of
  pil_loop            decoding the same PNG files from disk with PIL in a plain loop, one process
                      (the ceiling per process: nothing but open + decode + to array)
  folder_dataset      a plain image-folder torch Dataset (PIL decode, float tensor, uniform noise)
                      under a DataLoader with the same batch size and worker count
  loader              build_loader on the same images as WebDataset shards, same workers
  loader_inprocess    the same with data.workers=0, to compare with pil_loop process for process
and their ratios. Each rate covers whole epochs from iterator creation, worker start-up included;
contenders run in interleaved rounds and the best round counts (other load on the machine only
ever slows a round down).
Synthetic faces are generated into a temporary folder; nothing outside it is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.data import DataConfig, build_loader, dequantise, quantise
from pipeline.data.images import encode_png
from pipeline.data.ingest import write_shards
from pipeline.data.synth import make_face


class ImageFolder(Dataset):
    """The baseline: one file per sample, decoded with PIL, dequantised like the loader's output."""

    def __init__(self, files: list[Path], n_bits: int):
        self.files, self.n_bits = files, n_bits

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            k = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
        k = quantise(k, self.n_bits).float()
        return dequantise(k, self.n_bits, torch.rand_like(k))


def rate(images: int, seconds: float) -> float:
    return round(images / seconds, 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=1024, help="images")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n-bits", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats; the best counts")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    w, b = args.workers, args.batch_size

    with tempfile.TemporaryDirectory(prefix="lipflow-bench-data-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i in range(args.n):
            png = encode_png(make_face(args.resolution, 0, i))
            (folder / f"{i:06d}.png").write_bytes(png)
        files = sorted(folder.glob("*.png"))
        shard_size = max(1, args.n // (8 * max(1, w)))
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
            write_shards(
                folder,
                Path(tmp) / "shards",
                [args.resolution],
                val_fraction=0.0,
                shard_size=shard_size,
                workers=max(1, w),
                quiet=True,
            )
        shards = Path(tmp) / "shards" / str(args.resolution)
        disk_bytes = sum(f.stat().st_size for f in files)

        for f in files:  # page cache warm for every contender
            f.read_bytes()

        def pil_loop() -> tuple[int, float]:
            for _ in range(args.epochs):
                for f in files:
                    with Image.open(f) as img:
                        np.asarray(img.convert("RGB"))
            return args.epochs * len(files), 0.0

        def folder_dataset() -> tuple[int, float]:
            dataset = ImageFolder(files, args.n_bits)
            gen = torch.Generator().manual_seed(0)
            loader = DataLoader(dataset, b, shuffle=True, drop_last=True, num_workers=w,
                                generator=gen, persistent_workers=w > 0)  # fmt: skip
            return sum(x.shape[0] for _ in range(args.epochs) for x in loader), 0.0

        def ours(workers: int) -> tuple[int, float]:
            cfg = DataConfig(source="shards", resolution=args.resolution, n_bits=args.n_bits,
                             workers=workers)  # fmt: skip
            loader = build_loader(cfg, shards, "train", b, rank=0, world_size=1)
            start, it = time.perf_counter(), iter(loader)
            next(it)
            first = time.perf_counter() - start
            for _ in range(args.epochs * loader.batches_per_epoch - 1):
                next(it)
            return args.epochs * loader.batches_per_epoch * b, first

        contenders = {
            "pil_loop": pil_loop,
            "folder_dataset": folder_dataset,
            "loader": lambda: ours(w),
            "loader_inprocess": lambda: ours(0),
        }
        best: dict[str, float] = {}
        first_batch: dict[str, float] = {}
        for _ in range(args.rounds):  # interleaved rounds, best of each: load from others is noise
            for name, fn in contenders.items():
                start = time.perf_counter()
                images, first = fn()
                best[name] = max(best.get(name, 0.0), rate(images, time.perf_counter() - start))
                if name.startswith("loader"):
                    first_batch[name] = min(first_batch.get(name, 1e9), round(first, 3))

    result = {
        "config": {**vars(args), "shard_size": shard_size, "cpu_count": os.cpu_count()},
        "png_bytes_per_image": round(disk_bytes / len(files)),
        "images_per_s": best,
        "first_batch_s": first_batch,
        "ratios": {
            "loader_vs_folder_dataset": round(best["loader"] / best["folder_dataset"], 3),
            "loader_vs_pil_loop": round(best["loader"] / best["pil_loop"], 3),
            "loader_inprocess_vs_pil_loop": round(best["loader_inprocess"] / best["pil_loop"], 3),
        },
    }
    print(json.dumps(result, indent=1))
    return 0
