"""Benchmarks that print JSON (`python -m pipeline bench <name>`); BENCHMARKS.md has the numbers.

Measurements, never timed assertions: the slow tests only check that each prints valid JSON. Each
module has ``main(argv) -> int``; ``common`` holds what they share.
"""

NAMES = ("data", "peer", "scaling", "train")
