"""Files written whole or not at all, and values made fit for strict JSON.

Every file another process or a restarted run may read (configs, manifests, checkpoints' metadata,
images, exported models) is written to a temporary file beside it, fsynced, and renamed over it:
a kill or a crash leaves the old file or the new one, never a torn one. The temporary name starts
with a dot and ends with ``.tmp`` (``.<name>.<pid>-<random>.tmp``), so folder listings skip it and a
``*.tmp`` sweep removes what a killed writer left.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a path (``torch.save``, PIL's
    ``save``); on a clean exit it is fsynced and renamed to ``path``, on an exception removed.

        with atomic_path(out) as tmp:
            torch.save(blob, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks (shards and checkpoints are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON takes it (``json.dumps(..., allow_nan=False)``): non-finite floats as
    "nan", "inf", "-inf", tuples as lists, keys as strings, numpy scalars as plain numbers, any other
    object (a Path, a tensor) as its ``str``.

    For what must parse anywhere: events, summaries, results. metrics.jsonl keeps NaN as a number
    (Python reads it back) and the tracker sends only finite values to MLflow.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return str(value)
