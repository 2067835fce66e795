"""Append-only JSON-lines files: written by the training thread, tailed by the delivery thread."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

READ_CHUNK = 1 << 20


def open_journal(path: Path) -> TextIO:
    """Open ``path`` for appending whole lines, each flushed at its newline.

    A process killed mid-write can leave a last line without its newline; the next row would be glued
    onto it and both lost, so such a line is closed off first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            with open(path, "ab") as f:
                f.write(b"\n")
    return open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives as long as the sink)


def read_lines(path: Path, offset: int, max_bytes: int = READ_CHUNK) -> list[tuple[int, Any]]:
    """Complete lines from byte ``offset`` on: [(offset after the line, parsed record or None)].

    A line still being written (no newline yet) is left for the next call; a line that is not JSON
    (the remains of a crash) comes back as None so the reader can skip it and move on.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return []
    with f:
        f.seek(offset)
        data = f.read(max_bytes)
        while data and b"\n" not in data:  # one line longer than a chunk
            more = f.read(max_bytes)
            if not more:
                break
            data += more
    end = data.rfind(b"\n")
    out = []
    pos = offset
    for line in data[: end + 1].splitlines(keepends=True):
        pos += len(line)
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        out.append((pos, record))
    return out


def count_lines(path: Path, offset: int) -> int:
    """Complete lines after byte ``offset``."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(READ_CHUNK), b""))
    except FileNotFoundError:
        return 0


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
