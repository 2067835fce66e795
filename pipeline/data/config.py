"""The data section of the config tree (owned by pipeline/data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pipeline.ranges import NON_NEGATIVE, Range, at_least


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
    n_bits: int = 5  # quantisation depth of the model's input, 1..8 (docs/design.md §3)
    hflip: bool = True  # train split only
    workers: int = 0  # DataLoader worker processes per rank; 0 = decode in the training process
    shuffle_buffer: int = 256  # samples (raw bytes) held by each worker's shuffle buffer
    seed: int = 0

    RANGES: ClassVar[dict[str, Range]] = {
        "synthetic_train": at_least(1),
        "synthetic_val": at_least(1),
        "synthetic_shards": at_least(1),
        "resolution": at_least(2),
        "n_bits": Range(1, 8),
        "workers": NON_NEGATIVE,
        "shuffle_buffer": at_least(1),
        "seed": NON_NEGATIVE,
    }
