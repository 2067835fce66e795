"""Progress of a long command: one line per stage on stderr, and the stage a Ctrl-C names.

A stage is a phase that writes nothing (verifying, building, loading, computing): a command writes
its outputs after its stages, atomically, so that an interrupt inside one leaves nothing behind and
ends as `Interrupted`, which the entry point prints as one line (exit code 130) instead of a
traceback. Progress goes to stderr, so that stdout keeps only the results (`--json`)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.errors import PipelineError

_STAGES: list[list[str]] = []  # the stages entered and not left, innermost last ([name] each)


class Interrupted(PipelineError):
    """Ctrl-C (SIGINT) inside a stage."""

    exit_code = 130  # 128 + SIGINT, as a shell reports a command that SIGINT ended


def _message(name: str) -> str:
    return f"interrupted during {name}; nothing was written"


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Print "<name> ..."; a Ctrl-C until the block ends raises Interrupted naming `name`."""
    entry = [name]
    _STAGES.append(entry)
    try:
        print(f"{name} ...", file=sys.stderr, flush=True)
        yield
    except KeyboardInterrupt:
        raise Interrupted(_message(name)) from None
    finally:
        _STAGES.pop()  # stages nest: the innermost ends first


def end_stuck_interrupts(grace_s: float = 2.0) -> None:
    """Let a Ctrl-C inside a stage end the process even while a long native call runs (a batch
    of eigendecompositions, a convolution over 1024² images): Python raises KeyboardInterrupt
    only when the call returns, minutes later. A thread woken by the signal (set_wakeup_fd)
    waits `grace_s` for that, then prints the same line and exits with 130, which the stage's
    contract (nothing written) makes safe. For the entry point's process: call it once, from
    the main thread."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            if os.read(read, 1)[0] != signal.SIGINT or not _STAGES:
                continue
            entry = _STAGES[-1]
            time.sleep(grace_s)
            if any(e is entry for e in _STAGES):  # still inside: stuck in a native call
                # on a line of its own: a progress bar may hold the current one
                print(f"\nerror: {_message(entry[0])}", file=sys.stderr, flush=True)
                os._exit(Interrupted.exit_code)

    threading.Thread(target=watch, name="end-stuck-interrupts", daemon=True).start()
