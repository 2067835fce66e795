"""Tracking: metrics.jsonl always, mirrored to MLflow from the main rank (sink.py, delivery.py), MLflow
system metrics per node (system.py), and `python -m pipeline compare` (compare.py)."""
