"""The one base class of expected failures.

A bad config value, a missing or damaged shard folder or checkpoint, a full disk: the message names
the thing and what to do, so a traceback adds nothing for the user. The entry point
(pipeline/__main__.py) prints such an error as one line, ``error: <message>`` (rank 0 only under a
launcher), and exits non-zero; ``--debug`` or ``LIPFLOW_DEBUG=1`` shows the traceback instead, and a
training run also keeps it in its run folder (``error-rank<r>.log``). Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """An expected failure whose message says what to change."""

    exit_code = 1
