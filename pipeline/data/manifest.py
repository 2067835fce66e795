"""Shard sets on disk: the atomic tar writer, ``manifest.json``, and finding the set a config names.

Layout of one set (docs/design.md §4): ``<dir>/train-000000.tar ...``, ``<dir>/val-000000.tar ...`` and
``<dir>/manifest.json``. The manifest is written last and atomically, so its presence means every
shard it lists is complete; readers trust nothing else in the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import webdataset as wds

from pipeline.errors import PipelineError
from pipeline.io import atomic_write_text, sha256_file

FORMAT = "lipflow-shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class ShardError(PipelineError, ValueError):
    """A shard set that cannot be used as asked; the message names the path and what to do."""


class SplitWriter:
    """Rolls ``<prefix>-%06d.tar`` shards of ``shard_size`` samples, each written under a ``.tmp``
    name and renamed when complete, so a killed run never leaves a truncated tar under a final name.

    Tar headers carry mtime 0 and empty owner names: equal samples in equal order give equal bytes.
    """

    def __init__(self, out_dir: Path, prefix: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {shard_size}")
        self.out_dir, self.prefix, self.shard_size = Path(out_dir), prefix, shard_size
        self.records: list[dict[str, Any]] = []
        self._tar: wds.TarWriter | None = None
        self._file = None
        self._count = 0

    def write(self, key: str, png: bytes) -> None:
        if self._tar is None:
            name = f"{self.prefix}-{len(self.records):06d}.tar"
            self._file = open(self.out_dir / (name + ".tmp"), "wb")  # noqa: SIM115
            self._tar = wds.TarWriter(self._file, user="", group="", mtime=0, encoder=False)
            self._name, self._count = name, 0
        self._tar.write({"__key__": key, "png": png})
        self._count += 1
        if self._count == self.shard_size:
            self._finish()

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tmp = self.out_dir / (self._name + ".tmp")
        final = self.out_dir / self._name
        os.replace(tmp, final)
        self.records.append(
            {"name": self._name, "count": self._count, "sha256": sha256_file(final)}
        )
        self._tar = self._file = None

    def close(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._finish()
        return self.records


def clean_folder(out_dir: Path) -> None:
    """Before writing a set: drop the manifest (so no reader trusts a half-rewritten folder) and any
    ``.tmp`` left by a killed run."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for tmp in out_dir.glob("*.tmp"):
        tmp.unlink()


def finish_folder(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest, then remove shards of an earlier, larger set that it does not list."""
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    listed = {r["name"] for split in SPLITS for r in manifest["shards"][split]}
    for split in SPLITS:
        for old in out_dir.glob(f"{split}-*.tar"):
            if old.name not in listed:
                old.unlink()


def read_manifest(shards_dir: str | Path) -> dict[str, Any]:
    shards_dir = Path(shards_dir)
    path = shards_dir / MANIFEST
    if not path.is_file():
        found = sorted(p.parent.name for p in shards_dir.glob(f"*/{MANIFEST}"))
        hint = f" It holds the resolutions {', '.join(found)}: use {shards_dir}/R." if found else ""
        raise ShardError(
            f"no {MANIFEST} in {shards_dir}: not a finished shard set.{hint} Write one with "
            f"`python -m pipeline shards --src IMAGES --out DIR --resolution R` (then use DIR/R), "
            f"or rerun it if it was interrupted."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(
            f"{path} is not valid JSON ({e}); rerun `python -m pipeline shards`"
        ) from e
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def find_shard_dir(path: str | Path, resolution: int) -> Path:
    """``path`` itself when it holds a manifest, else ``path/<resolution>`` (the shards command's
    output root); the error lists the resolutions that are there."""
    path = Path(path)
    if not path.exists():
        raise ShardError(f"shard folder {path} does not exist; check data.shards")
    if (path / MANIFEST).is_file():
        return path
    if (path / str(resolution) / MANIFEST).is_file():
        return path / str(resolution)
    found = sorted(p.parent.name for p in path.glob(f"*/{MANIFEST}"))
    hint = f" It holds resolutions {', '.join(found)}." if found else ""
    raise ShardError(
        f"no {MANIFEST} in {path} or {path / str(resolution)}.{hint} Point data.shards at the "
        f"output of `python -m pipeline shards` that has --resolution {resolution}."
    )
