"""Opening an MLflow store, safely when several processes open one SQLite file at once.

``MlflowClient(uri)`` builds its store on construction, and for a SQLite file that means creating
the schema on first use and running MLflow's migrations on an older one. Neither is safe between
processes: runs started together under one run root (a job array, a sweep) died with "table ...
already exists" or alembic's "Online migration expected to match one row". So the first client of a
process on a SQLite store is built under an exclusive ``flock`` on ``<db>.lock`` beside the database:
one process creates or migrates, the others wait and then find the schema current. Later writes
rely on SQLite's own locking (a busy database is an error the delivery thread retries). MLflow
caches the store per process and URI, so the lock is taken once per process, not per call.
"""

from __future__ import annotations

import fcntl
import time
from pathlib import Path
from typing import Any

SQLITE = "sqlite:///"
LOCK_WAIT_S = 120.0  # a fresh store takes ~5-10 s to create here; longer means a stuck holder
POLL_S = 0.1


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative or absolute); None for anything else."""
    if not uri.startswith(SQLITE) or uri == SQLITE:
        return None
    path = uri[len(SQLITE) :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def local_artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database, not into ./mlruns of whatever the cwd is."""
    path = sqlite_file(uri)
    return None if path is None else (path.resolve().parent / "mlartifacts").as_uri()


def open_client(uri: str, wait_s: float = LOCK_WAIT_S) -> Any:
    """An ``MlflowClient`` on ``uri``, its store created or migrated by one process at a time.

    Raises whatever the store raises (unreachable, unwritable), or TimeoutError when another
    process held the lock for ``wait_s``: callers that must not fail retry later.
    """
    from mlflow.tracking import MlflowClient

    path = sqlite_file(uri)
    if path is None:
        return MlflowClient(uri)
    lock = path.parent / f"{path.name}.lock"
    with open(lock, "a") as f:  # closing it releases the lock, also when the process dies
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{lock} held by another process for {wait_s:.0f} s (creating or "
                        f"migrating the MLflow store {path})"
                    ) from None
                time.sleep(POLL_S)
        return MlflowClient(uri)
