"""Data: image folders -> WebDataset shards -> exactly resumable per-rank batches.

    prepare_synthetic(cfg) -> Path    procedural faces sharded under cfg.cache (rank 0, then barrier)
    resolve_shards(cfg) -> Path       the shard folder a config names, checked
    build_loader(cfg, shards_dir, split, batch_size, rank, world_size) -> Loader

This package is the only place that imports webdataset.
"""

from pipeline.data.config import DataConfig
from pipeline.data.loader import BadSamples, Loader, build_loader, dequantise
from pipeline.data.manifest import ShardError, read_manifest
from pipeline.data.source import prepare_synthetic, resolve_shards, synthetic_dir

__all__ = [
    "BadSamples",
    "DataConfig",
    "Loader",
    "ShardError",
    "build_loader",
    "dequantise",
    "prepare_synthetic",
    "read_manifest",
    "resolve_shards",
    "synthetic_dir",
]
