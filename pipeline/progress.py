"""Progress of a long command: one line per stage on stderr, and the stage a Ctrl-C names.

A stage is a phase that writes nothing (verifying, building, loading, computing): a command writes
its outputs after its stages, atomically, so that an interrupt inside one leaves nothing behind and
ends as `Interrupted`, which the entry point prints as one line (exit code 130) instead of a
traceback. Progress goes to stderr, so that stdout keeps only the results (`--json`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.errors import PipelineError


class Interrupted(PipelineError):
    """Ctrl-C (SIGINT) inside a stage."""

    exit_code = 130  # 128 + SIGINT, as a shell reports a command that SIGINT ended


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Print "<name> ..."; a Ctrl-C until the block ends raises Interrupted naming `name`."""
    try:
        print(f"{name} ...", file=sys.stderr, flush=True)
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted during {name}; nothing was written") from None
