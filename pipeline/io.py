"""Files written whole or not at all.

Every file another process or a restarted run may read (configs, manifests, checkpoints' metadata,
images, exported models) is written to a temporary file beside it, fsynced, and renamed over it:
a kill or a crash leaves the old file or the new one, never a torn one. The temporary name starts
with a dot and ends with ``.tmp`` (``.<name>.<pid>-<random>.tmp``), so folder listings skip it and a
``*.tmp`` sweep removes what a killed writer left.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


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
