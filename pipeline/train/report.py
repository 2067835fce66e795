"""What a run tells: every step's record (metrics row, progress line, validation and sample grids on
their schedules, skipped shards), the end-of-run checks of a finished run, and the one outcome
record every way out writes (summary.json, the MLflow model, the run's status)."""

from __future__ import annotations

import resource
import sys
import time
import traceback
from pathlib import Path

import torch

from pipeline import distributed as dist
from pipeline.config import Config, to_dict
from pipeline.theory.battery import battery_damage, exploding_inverse_battery
from pipeline.track.sink import write_summary
from pipeline.train import checkpoint
from pipeline.train.images import draw_panel, draw_samples
from pipeline.train.run import PANEL_IMAGES, Run
from pipeline.train.state import TrainState
from pipeline.train.step import validate

FINISHED_DAMAGED = "finished_damaged"


class Reporter:
    """A step's record: images/s between log lines and peak memory with the metrics row and the
    progress line at log steps, validation and a sample grid at theirs, and a ``bad_shard`` event
    for each shard this rank's stream newly skipped (its bytes no longer match the manifest)."""

    def __init__(self, run: Run):
        train = run.cfg.train
        self.run = run
        self.images_per_step = train.micro_batch * train.grad_accum * dist.world_size()
        self.t, self.since = time.perf_counter(), run.state.step

    def step(self, metrics: dict) -> None:
        run, state, train = self.run, self.run.state, self.run.cfg.train
        for shard in sorted(run.loader.bad_shards - run.reported_bad_shards):
            run.reported_bad_shards.add(shard)
            run.event("bad_shard", shard=shard, rank=dist.rank())
            dist.say(f"data: skipped {shard}: its sha256 does not match the manifest")
        if every(state.step, train.log_every) or state.step == train.steps:
            guard = {"guard/rollbacks": state.rollbacks, "guard/skipped": state.skipped_steps}
            run.sink.log(state.step, {**metrics, **self.speed(state.step), **guard})
            dist.say(progress_line(state, train.steps, metrics))
        if every(state.step, train.val_every):
            run.sink.log(state.step, {"val/bpd": validate(run.engine, run.val_loader, train)})
        if every(state.step, train.sample_every) and dist.is_main():
            path = run.cfg.run.dir / "samples" / f"step{state.step:08d}.png"
            draw_samples(run.model, train.samples, train.temperature, path)
            run.sink.log_artifact(path, "samples")

    def speed(self, step: int) -> dict:
        now = time.perf_counter()
        speed = (step - self.since) * self.images_per_step / max(now - self.t, 1e-9)
        self.t, self.since = now, step
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        return {"speed/images_per_s": speed, "memory/peak_bytes": float(peak)}


def every(step: int, n: int) -> bool:
    return bool(n) and step % n == 0


def progress_line(state: TrainState, steps: int, m: dict) -> str:
    extra = f"  skipped {state.skipped_steps}" if state.skipped_steps else ""
    extra += f"  rollbacks {state.rollbacks}" if state.rollbacks else ""
    return (
        f"step {state.step:>6}/{steps}  bpd {m['train/bpd']:.4f}  "
        f"grad {m['optim/grad_norm']:.3g}  lr {m['optim/lr']:.2e}{extra}"
    )


# --- the end of a run -----------------------------------------------------------------------------


def final_checks(run: Run) -> dict:
    """A finished run's last look at its model: final validation, the exploding-inverse battery
    and the panel (main rank, on the same val images), the final sample grid. Returns the
    outcome's fields: ``status`` (finished, or finished_damaged with the ``reason`` if the battery
    found non-finite samples or bpd: the verdict broadcast, so every rank ends alike),
    ``final_val_bpd`` and ``battery``."""
    cfg, state = run.cfg, run.state
    val_bpd = validate(run.engine, run.val_loader, cfg.train)
    n_battery, x = cfg.guard.battery_images, run.val_images
    battery = {}
    if n_battery and x is not None:
        images = x[:n_battery]
        battery = exploding_inverse_battery(
            run.model, images, n_images=n_battery, n_samples=2 * n_battery, n_grad=min(8, n_battery)
        )
    run.sink.log(state.step, {"val/bpd": val_bpd, **battery})
    outcome = {"status": "finished", "final_val_bpd": val_bpd, "battery": battery}
    damage = dist.broadcast_object(battery_damage(battery))
    if damage is not None:
        outcome.update(status=FINISHED_DAMAGED, reason=f"final battery: {damage}")
        run.event("damaged_model", problem=damage)
        dist.say(f"guard: the final model is damaged: {damage}")
    if dist.is_main():
        samples, panel = cfg.run.dir / "samples.png", cfg.run.dir / "panel.png"
        draw_samples(run.model, cfg.train.samples, cfg.train.temperature, samples)
        if x is not None:
            draw_panel(run.model, x[:PANEL_IMAGES], panel)
        for path in (samples, panel) if x is not None else (samples,):
            run.sink.log_artifact(path)
    return outcome


def write_outcome(cfg: Config, run: Run | None, status: str, **outcome) -> dict:
    """The run's one outcome record, written on every way out as <run>/summary.json.

    ``status``: finished or finished_damaged (with ``final_checks``'s fields), preempted (SIGTERM, checkpoint saved), diverged (the guard ran out of
    rollbacks) or failed (an exception; ``run`` is None when it came before the run was built:
    then the file alone). ``outcome`` adds ``reason`` and, for a divergence, the ``last_events``.
    Only a finished or diverged run tears down the process group: after a failure the other ranks
    may be waiting in a collective.
    """
    val_bpd, battery = outcome.pop("final_val_bpd", None), outcome.pop("battery", {})
    state = run.state if run is not None else TrainState()
    sink = run.sink if run is not None else None
    latest = checkpoint.find_latest(cfg.run.dir / "checkpoints")
    samples, panel = cfg.run.dir / "samples.png", cfg.run.dir / "panel.png"
    summary = {
        "status": status,
        **outcome,
        "final_val_bpd": val_bpd,
        "optimum_bpd": state.optimum_bpd,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "rollbacks": state.rollbacks,
        "lr_scale": state.lr_scale,
        "event_counts": state.event_counts,
        "run_dir": str(cfg.run.dir.resolve()),
        "samples": str(samples.resolve()) if samples.is_file() else None,
        "panel": str(panel.resolve()) if panel.is_file() else None,
        "tracking_uri": sink and sink.uri,
        "mlflow_run_id": sink and sink.run_id,
        "mlflow_experiment_id": sink and sink.experiment_id,
        "checkpoint": str(latest.resolve()) if latest is not None else None,
        # what the main rank's stream skipped (data/bad_samples in metrics.jsonl: all ranks)
        "bad_samples": dict(run.loader.bad_samples) if run is not None else {},
        "bad_shards": sorted(run.loader.bad_shards) if run is not None else [],
        "battery": battery,
    }
    if run is not None:
        from pipeline.track.model import log_final_model  # the MLflow model of the final weights

        final = (run.model, to_dict(cfg), state.step, cfg.run.dir)
        summary.update(log_final_model(run.sink, cfg.tracking, status, *final))
        run.sink.log_artifact(cfg.run.dir / "config.yaml")
        run.sink.log_summary(summary)
        run.sink.close(status={"finished": "FINISHED", "preempted": "KILLED"}.get(status, "FAILED"))
        if status in ("finished", FINISHED_DAMAGED, "diverged"):
            dist.teardown()
    elif dist.is_main():  # failed before the run was built: nothing to track with, the file alone
        write_summary(cfg.run.dir, summary)
    return summary


def keep_traceback(run_dir: Path) -> None:
    """The failure's traceback in <run>/error-rank<r>.log: the entry point prints an expected error
    as one line, so this is where the whole story stays (best effort: the disk may be full)."""
    try:
        path = run_dir / f"error-rank{dist.rank()}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(traceback.format_exc())
    except OSError:
        pass


def write_failure(cfg: Config, run: Run | None, error: BaseException) -> None:
    """A failure's traceback file and outcome; a second failure (e.g. on a full disk) only warns:
    it must not mask the error that ended the run."""
    keep_traceback(cfg.run.dir)
    try:
        write_outcome(cfg, run, "failed", reason=f"{type(error).__name__}: {error}")
    except Exception as secondary:
        print(f"warning: could not write the run's summary: {secondary}", file=sys.stderr)
