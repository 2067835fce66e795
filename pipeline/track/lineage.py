"""Dataset lineage: the shard set a run reads, as MLflow dataset inputs of its run.

Each split of the set (train, val) is one MLflow dataset, logged with the context "training" or
"validation":

    name     the set's folder and the split, e.g. synthetic-r16-n128-v32-s0-train (the folder of a
             resolution, <out>/<res>, is named by its parent and -r<res>)
    digest   12 hex digits of sha256 over the split's (shard name, shard sha256) in the manifest:
             equal bytes, equal digest; any rewritten shard changes it
    source   the shard folder (a local path)
    schema   uint8 images [-1, res, res, 3]
    profile  images, resolution, shards, image format, where the images came from

so runs on different data differ in the UI's Datasets column and in ``compare``'s table. Run
assembly logs them with the shard folder it resolved (through the sink's outbox, so a store that is
down gets them later); MLflow keeps one input per run and dataset, so a resume adds none.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONTEXTS = {"train": "training", "val": "validation"}
DIGEST_CHARS = 12


def split_digest(records: list[dict[str, Any]]) -> str:
    text = "\n".join(f"{r['name']} {r['sha256']}" for r in records)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def set_name(shards_dir: Path, resolution: int) -> str:
    if shards_dir.name != str(resolution):
        return shards_dir.name
    base = shards_dir.resolve().parent.name
    return base if f"r{resolution}" in base.split("-") else f"{base}-r{resolution}"


def shard_datasets(shards_dir: Path) -> list[dict[str, str]]:
    """The train and val datasets of a shard folder (one holding manifest.json), as plain dicts
    of MLflow's dataset fields plus "context": they travel through the outbox as JSON."""
    import numpy as np
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    from pipeline.data.manifest import read_manifest

    shards_dir = Path(shards_dir).resolve()
    manifest = read_manifest(shards_dir)
    resolution = int(manifest["resolution"])
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, resolution, resolution, 3), "image")])
    datasets = []
    for split, context in CONTEXTS.items():
        records = manifest["shards"][split]
        dataset = MetaDataset(
            local_source(str(shards_dir)),
            name=f"{set_name(shards_dir, resolution)}-{split}",
            digest=split_digest(records),
            schema=schema,
        )
        profile = {
            "images": int(manifest["counts"][split]),
            "resolution": resolution,
            "shards": len(records),
            "image_format": manifest.get("image_format", "png"),
            "source": manifest.get("source", {}),
        }
        datasets.append({**dataset.to_dict(), "profile": json.dumps(profile), "context": context})
    return datasets


def run_datasets(shards_dir: Path) -> list[dict[str, str]]:
    """``shard_datasets`` for a training run, which must not stop for lineage: [] and a warning
    if the shard folder's manifest cannot be read."""
    try:
        return shard_datasets(shards_dir)
    except Exception as e:
        log.warning("dataset lineage not logged for %s: %s", shards_dir, str(e)[:300])
        return []


def dataset_inputs(datasets: list[dict[str, str]]) -> list:
    """``shard_datasets``'s dicts -> MLflow DatasetInputs for ``MlflowClient.log_inputs``."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    fields = ("name", "digest", "source_type", "source", "schema", "profile")
    return [
        DatasetInput(
            Dataset(**{k: d.get(k) for k in fields}),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])],
        )
        for d in datasets
    ]


def local_source(path: str):
    """MLflow's source for a local folder (source type "local", {"uri": path})."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json

    return get_dataset_source_from_json(json.dumps({"uri": path}), source_type="local")
