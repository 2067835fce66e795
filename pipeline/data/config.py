"""The data section of the config tree (owned by pipeline/data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    # "synthetic": procedural faces, generated and sharded under `cache` on first use (demo, CI);
    # "shards": read `shards`, the output of `python -m pipeline shards` (<out> or <out>/<res>).
    source: Literal["synthetic", "shards"] = "synthetic"
    shards: str = ""
    cache: str = "data"
    synthetic_train: int = 512
    synthetic_val: int = 64
    # shards per split of the synthetic set: every rank x worker reader needs at least one
    synthetic_shards: int = 16
    resolution: int = 32
    n_bits: int = 5  # quantisation depth of the model's input, 1..8 (DESIGN.md §3)
    hflip: bool = True  # train split only
    workers: int = 0  # DataLoader worker processes per rank; 0 = decode in the training process
    shuffle_buffer: int = 256  # samples (raw bytes) held by each worker's shuffle buffer
    seed: int = 0
