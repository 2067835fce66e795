"""Benchmarks that print JSON (`python -m pipeline bench <name>`); BENCHMARKS.md has the numbers.

Measurements, never timed assertions: the slow tests only check that each prints valid JSON. Each
module has ``add_arguments(parser)`` and ``run(args) -> int``, as the commands and the studies do
(pipeline/commands/bench.py lists them); ``common`` holds what they share. Their worker processes
start through the same entry point (`python -m pipeline bench <name> --worker ...`).
"""
