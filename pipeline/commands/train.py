"""`python -m pipeline train --config X [a.b=value ...]`."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from pipeline.config import Config, add_config_arguments, check_batch, config_from_args
from pipeline.track.ui import ui_command, ui_link


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--summary-json", help="also write the end-of-run summary to this file")


DIVERGED_EXIT, DAMAGED_EXIT = 3, 4


def run(args: argparse.Namespace) -> int:
    """0 for a finished or preempted run, 3 for a diverged one, 4 for one that finished with a
    damaged model (0 with guard.allow_damaged=true); a failure raises. The run's summary.json
    (written by the loop on every way out) is copied to --summary-json."""
    cfg = config_from_args(args)
    check_inputs(cfg)
    from pipeline import distributed as dist
    from pipeline.train.loop import train

    try:
        summary = train(cfg)
    finally:
        written = cfg.run.dir / "summary.json"
        if dist.is_main() and args.summary_json and written.is_file():
            shutil.copyfile(written, args.summary_json)
    code = exit_code(summary["status"], cfg.guard.allow_damaged)
    if not dist.is_main():
        return code
    print_summary(summary)
    if summary["status"] == "diverged":
        print(
            f"error: {summary['reason']}; the last events are in {written}. Lower train.lr, "
            "raise train.warmup_steps, or keep the certified default blocks (no model.* preset)",
            file=sys.stderr,
        )
    elif summary["status"] == "finished_damaged":
        print(
            f"{'warning' if code == 0 else 'error'}: the run finished but its model is damaged "
            f"({summary['reason']}): its sampler or density is not usable. Resume from an earlier "
            "checkpoint with a lower train.lr, or keep the certified default blocks (no model.* "
            "preset); guard.allow_damaged=true exits 0 all the same",
            file=sys.stderr,
        )
    return code


def exit_code(status: str, allow_damaged: bool) -> int:
    if status == "diverged":
        return DIVERGED_EXIT
    return DAMAGED_EXIT if status == "finished_damaged" and not allow_damaged else 0


def check_inputs(cfg: Config) -> None:
    """What the config names must be there before any work starts: the batch arithmetic for the
    ranks this process runs with, and a shard folder holding the resolution asked for."""
    check_batch(cfg.train, int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.data.source == "shards":
        from pipeline.data import resolve_shards

        resolve_shards(cfg.data)  # ShardError names the folder and what to do


def final_line(s: dict) -> str:
    if s["final_val_bpd"] is None:
        return f"final validation bits/dim : skipped ({s['status']} at step {s['steps']})"
    gap = ""
    if s.get("optimum_bpd") is not None:
        gap = f", linear-flow optimum {s['optimum_bpd']:.4f}"
    return f"final validation bits/dim : {s['final_val_bpd']:.4f}  (after {s['steps']} steps{gap})"


def battery_lines(b: dict) -> list[str]:
    """The exploding-inverse battery in two lines: off-data inputs and the sampler."""
    if not b:
        return []

    def pct(key: str) -> str:
        value = b.get(key)
        return f"{100 * value:.0f}%" if isinstance(value, int | float) else "-"

    return [
        f"bpd finite off the data   : noise 3x {pct('battery/noise_3x/finite_frac')}, "
        f"noise 10x {pct('battery/noise_10x/finite_frac')}, "
        f"N(0,1) {pct('battery/normal/finite_frac')}",
        f"non-finite samples        : T=1.5 {pct('battery/sample_T1.5/nonfinite_frac')}, "
        f"T=2 {pct('battery/sample_T2/nonfinite_frac')}  (python -m pipeline probe: all of it)",
    ]


def model_lines(s: dict) -> list[str]:
    """Where the final model went in MLflow (or why it did not), and its registry version."""
    if not s.get("mlflow_model") and not s.get("mlflow_model_reason"):
        return []
    model = s.get("mlflow_model") or f"not logged: {s.get('mlflow_model_reason')}"
    lines = [f"MLflow model              : {model}"]
    if s.get("mlflow_model"):
        lines[0] += "  (mlflow.pyfunc.load_model; predict(images) -> bpd, log_likelihood)"
    if s.get("registered_model"):
        lines.append(f"registered model          : {s['registered_model']}")
    return lines


def ui_lines(s: dict) -> list[str]:
    """How to see the run in a browser: the command serving a local store, and the run's page."""
    uri, lines = s["tracking_uri"], []
    if uri and (command := ui_command(uri)):
        lines.append(f"open the MLflow UI        : {command}")
    if s.get("mlflow_experiment_id") and s["mlflow_run_id"]:
        link = ui_link(uri, s["mlflow_experiment_id"], s["mlflow_run_id"])
        lines.append(f"the run in the MLflow UI  : {link}")
    return lines


def print_summary(s: dict) -> None:
    uri = s["tracking_uri"]
    print(
        "\n".join(
            [
                "",
                "=" * 72,
                final_line(s),
                *battery_lines(s.get("battery") or {}),
                f"run folder                : {s['run_dir']}",
                f"samples                   : {s['samples'] or 'none'}",
                f"panel (data, recon, T)    : {s.get('panel') or 'none'}",
                f"last checkpoint           : {s['checkpoint'] or 'none'}",
                f"MLflow store              : {uri}  (run {s['mlflow_run_id']})",
                *model_lines(s),
                *ui_lines(s),
                "=" * 72,
            ]
        ),
        flush=True,
    )
