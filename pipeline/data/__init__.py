"""Data: image folders -> WebDataset shards -> exactly resumable per-rank batches.

    prepare_synthetic(cfg) -> Path    procedural faces sharded under cfg.cache (rank 0, then barrier)
    resolve_shards(cfg) -> Path       the shard folder a config names, checked
    build_loader(cfg, shards_dir, split, batch_size, rank, world_size) -> Loader
    iter_levels(shards_dir, n_bits) -> uint8 batches of n-bit levels (for the optimum)
    quantise, dequantise, to_pixels   the n-bit rule between pixels and the flow's input

This package is the only place that imports webdataset, and only when a name that needs it is
first used (PEP 562 ``__getattr__``): pipeline/theory and the MLflow pyfunc, which must not import
it, take the n-bit rule from here too.
"""

import importlib

from pipeline.data.config import DataConfig
from pipeline.data.quantise import dequantise, quantise, to_pixels

LAZY = {  # name -> its module, imported on first use (webdataset, PIL)
    "BadSamples": "loader",
    "Loader": "loader",
    "build_loader": "loader",
    "iter_levels": "loader",
    "ShardError": "manifest",
    "read_manifest": "manifest",
    "prepare_synthetic": "source",
    "resolve_shards": "source",
    "synthetic_dir": "source",
}

__all__ = ["DataConfig", "dequantise", "quantise", "to_pixels", *LAZY]


def __getattr__(name: str):
    if name not in LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{LAZY[name]}"), name)
