"""Tracking: metrics.jsonl always, mirrored to MLflow from the main rank (sink.py, delivery.py), MLflow
system metrics per node (system.py), the shard set as dataset inputs (lineage.py), the final weights
as an MLflow pyfunc model (model.py, pyfunc.py), `python -m pipeline compare` (compare.py), and the
way to the run in MLflow's UI (ui.py)."""
