"""Where a config's images come from: the synthetic set (generated and sharded on first use) or a
shard set written by ``python -m pipeline shards``. Both end as the same folder layout behind the
same loader.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path

from pipeline.data.config import DataConfig
from pipeline.data.images import encode_png
from pipeline.data.manifest import (
    FORMAT,
    MANIFEST,
    ShardError,
    SplitWriter,
    find_shard_dir,
    finish_folder,
    read_manifest,
)
from pipeline.data.synth import make_face


def synthetic_dir(cfg: DataConfig) -> Path:
    """``<cache>/synthetic-r<res>-n<train>-v<val>-s<seed>/<res>``: every input of the set is in the
    name, so a changed config never reuses a stale set."""
    name = f"synthetic-r{cfg.resolution}-n{cfg.synthetic_train}-v{cfg.synthetic_val}-s{cfg.seed}"
    return Path(cfg.cache) / name / str(cfg.resolution)


def prepare_synthetic(cfg: DataConfig) -> Path:
    """Generate the synthetic faces and shard them under ``cfg.cache``; return the shard folder.

    Idempotent and safe on every rank at once: the set is built in a private temporary folder and
    renamed into place in one step; when a complete manifest is already there, this returns at once.
    (The intended use is rank 0 first, a barrier, then ``resolve_shards`` everywhere; concurrent
    callers only waste work, they never see a partial set.) Images ``0 .. synthetic_train-1`` form
    the train split and the next ``synthetic_val`` the val split; each split gets
    ``synthetic_shards`` shards (fewer if it has fewer images), enough for several ranks × workers.
    """
    if cfg.synthetic_train < 1 or cfg.synthetic_val < 1:
        raise ValueError(
            f"data.synthetic_train={cfg.synthetic_train} and "
            f"data.synthetic_val={cfg.synthetic_val} must both be >= 1"
        )
    final = synthetic_dir(cfg)
    if (final / MANIFEST).is_file():
        return final
    root = final.parent
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = root.with_name(f"{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    work = tmp_root / str(cfg.resolution)
    work.mkdir(parents=True)
    try:
        shards, counts = {}, {}
        for split, first, n in (
            ("train", 0, cfg.synthetic_train),
            ("val", cfg.synthetic_train, cfg.synthetic_val),
        ):
            writer = SplitWriter(work, split, math.ceil(n / max(1, cfg.synthetic_shards)))
            for i in range(first, first + n):
                writer.write(f"{i:06d}", encode_png(make_face(cfg.resolution, cfg.seed, i)))
            shards[split], counts[split] = writer.close(), n
        finish_folder(
            work,
            {
                "format": FORMAT,
                "resolution": cfg.resolution,
                "image_format": "png",
                "counts": counts,
                "source": {"kind": "synthetic", "seed": cfg.seed},
                "split_rule": f"image index < {cfg.synthetic_train} -> train, else val",
                "skipped": {},
                "converted": {},
                "shards": shards,
            },
        )
        try:
            os.replace(tmp_root, root)
        except OSError:
            # another rank finished first (the target is a non-empty folder); theirs is identical
            if not (final / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return final


def resolve_shards(cfg: DataConfig) -> Path:
    """The shard folder for this config, checked to hold a manifest of ``cfg.resolution``.

    source="synthetic": the folder ``prepare_synthetic`` writes (call that first, on rank 0).
    source="shards": ``cfg.shards`` itself or ``cfg.shards/<resolution>``.
    """
    if cfg.source == "synthetic":
        path = synthetic_dir(cfg)
        if not (path / MANIFEST).is_file():
            raise ShardError(
                f"synthetic shards not found at {path}; call prepare_synthetic(cfg) (rank 0, "
                f"then a barrier) before resolve_shards"
            )
    elif cfg.source == "shards":
        if not cfg.shards:
            raise ShardError("data.source=shards needs data.shards=<folder written by `shards`>")
        path = find_shard_dir(cfg.shards, cfg.resolution)
    else:
        raise ShardError(f"data.source={cfg.source!r}; expected 'synthetic' or 'shards'")
    check_resolution(read_manifest(path), path, cfg.resolution)
    return path


def check_resolution(manifest: dict, path: Path, resolution: int) -> None:
    if manifest["resolution"] != resolution:
        raise ShardError(
            f"{path / MANIFEST} holds {manifest['resolution']}² images but data.resolution is "
            f"{resolution}; set data.resolution={manifest['resolution']} or point data.shards at "
            f"the {resolution} folder (`python -m pipeline shards ... --resolution {resolution}`)"
        )
