"""The training loop: build -> resume -> loop {batch -> forward -> backward -> guard -> step -> log -> save}.

Run assembly (fresh start or resume) lives in pipeline/train/run.py, the builders in build.py,
one-step mechanics below the loop; this function reads top to bottom.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
import traceback
from pathlib import Path

import torch

from pipeline import distributed as dist
from pipeline.config import Config, to_dict
from pipeline.flows.base import reuse_weights
from pipeline.theory.battery import battery_damage, exploding_inverse_battery, sampler_check
from pipeline.theory.config import GuardConfig
from pipeline.theory.diagnostics import flow_diagnostics, grad_norms
from pipeline.track.sink import write_summary
from pipeline.train import checkpoint, faults
from pipeline.train.config import TrainConfig
from pipeline.train.guard import ROLLBACK, STOP, DivergenceStop
from pipeline.train.images import save_grid, save_panel
from pipeline.train.run import Run, build_run, first_images, log_damaged, say
from pipeline.train.state import TrainState


def train(cfg: Config) -> dict:
    """Train to ``cfg.train.steps``; every way out writes one summary.json (see ``finish``).

    Returns the summary of a finished, preempted or diverged run; a failure (any other exception)
    writes its summary and re-raises.
    """
    dist.setup()
    run = None
    try:
        run = build_run(cfg)
        state, train_cfg, sink = run.state, cfg.train, run.sink
        batches, meter = iter(run.loader), Throughput(train_cfg, state.step)
        while state.step < train_cfg.steps:
            metrics, preempted, x = train_step(run, batches)
            faults.maybe_damage_prior(cfg.faults, run.model, state.step + 1)
            state.step, state.samples = state.step + 1, state.samples + meter.images_per_step
            state.epoch = run.loader.epoch
            saving = (
                preempted
                or every(state.step, train_cfg.save_every)
                or state.step == train_cfg.steps
            )
            metrics.update(maybe_diagnose(run, state.step, x, saving))
            metrics.update(optimum_gap(state, metrics))
            rolled_back = guard_step(run, metrics)
            note_bad_shards(run)
            if every(state.step, train_cfg.log_every) or state.step == train_cfg.steps:
                sink.log(state.step, {**metrics, **meter.read(state.step), **event_metrics(state)})
                say(progress_line(state, train_cfg.steps, metrics))
            if every(state.step, train_cfg.val_every):
                sink.log(state.step, {"val/bpd": validate(run.engine, run.val_loader, train_cfg)})
            if every(state.step, train_cfg.sample_every):
                sample_grid(run, cfg.run.dir / "samples" / f"step{state.step:08d}.png")
            # after a rollback the weights are the target's: saving them again as new would only
            # shadow it (the guard's escalation goes by the target's step)
            if saving and not (rolled_back and not preempted and state.step < train_cfg.steps):
                run.save()
            faults.maybe_kill(cfg.faults, state.step)
            if preempted:
                say(
                    f"SIGTERM: checkpoint at step {state.step} saved; exiting so the job can be requeued"
                )
                return finish(run, cfg, "preempted")
        return finish(run, cfg, "finished")
    except DivergenceStop as stop:  # every rank alike: a result of the run, not a crash
        return finish(run, cfg, "diverged", reason=str(stop), last_events=stop.events)
    except BaseException as error:
        keep_traceback(cfg.run.dir)
        try:  # e.g. on a full disk: the summary must not mask the error that ended the run
            finish(run, cfg, "failed", reason=f"{type(error).__name__}: {error}")
        except Exception as secondary:
            print(f"warning: could not write the run's summary: {secondary}", file=sys.stderr)
        raise
    finally:
        if run is not None:
            run.preemption.uninstall()


def keep_traceback(run_dir: Path) -> None:
    """The failure's traceback in <run>/error-rank<r>.log: the entry point prints an expected error
    as one line, so this is where the whole story stays (best effort: the disk may be full)."""
    try:
        path = run_dir / f"error-rank{dist.rank()}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(traceback.format_exc())
    except OSError:
        pass


def guard_step(run: Run, metrics: dict) -> bool:
    """Record the step's events; roll back or stop when the guard says so (same on every rank).
    Returns whether it rolled back."""
    events, action = run.guard.observe(run.state, metrics)
    for event in events:
        run.sink.log_event({**event.to_dict(), "count": run.state.event_counts[event.kind]})
        say(
            f"guard: step {event.step} {event.kind} value {event.value:.4g} "
            f"threshold {event.threshold:.4g}"
        )
    try:
        if action == ROLLBACK:
            target, damaged = roll_back(run.engine, run.ckpt_root, run.state, run.cfg.guard)
            for bad, problem in damaged:
                log_damaged(run, bad, problem)
            run.guard.rolled_back(run.state, checkpoint.read_state(target).detector)
        elif action == STOP:
            raise DivergenceStop(f"diverged after {run.state.rollbacks} rollbacks")
    except DivergenceStop as stop:
        raise DivergenceStop(str(stop), [e.to_dict() for e in events]) from None
    return action == ROLLBACK


def note_bad_shards(run: Run) -> None:
    """A `bad_shard` event (events.jsonl, MLflow tags) for each shard this rank's stream newly
    skipped because its bytes no longer match the manifest's sha256."""
    for shard in sorted(run.loader.bad_shards - run.reported_bad_shards):
        run.reported_bad_shards.add(shard)
        event = {"kind": "bad_shard", "step": run.state.step, "shard": shard, "rank": dist.rank()}
        run.sink.log_event(event)
        say(f"data: skipped {shard}: its sha256 does not match the manifest")


def finish(run: Run | None, cfg: Config, status: str, **outcome) -> dict:
    """The run's one outcome record, written on every way out as <run>/summary.json.

    ``status``: finished (final validation and samples first), preempted (SIGTERM, checkpoint
    saved), diverged (the guard ran out of rollbacks) or failed (an exception; ``run`` is None when
    it came before the run was built). A finished run whose final battery finds non-finite samples
    or bpd becomes finished_damaged, its ``reason`` saying what (the verdict broadcast, so every
    rank ends alike). ``outcome`` adds ``reason`` and, for a divergence, the ``last_events``. Only
    a finished or diverged run tears down the process group: after a failure the other ranks may
    be waiting in a collective.
    """
    state = run.state if run is not None else TrainState()
    val_bpd = None
    battery = {}
    if status == "finished":
        val_bpd = validate(run.engine, run.val_loader, cfg.train)
        n_battery = cfg.guard.battery_images
        # one read of val images (main rank) for both the battery and the panel
        x = first_images(run.val_loader, max(n_battery, PANEL_IMAGES)) if dist.is_main() else None
        battery = maybe_battery(run.model, x, n_battery)
        run.sink.log(state.step, {"val/bpd": val_bpd, **battery})
        damage = dist.broadcast_object(battery_damage(battery))
        if damage is not None:
            status, outcome["reason"] = FINISHED_DAMAGED, f"final battery: {damage}"
            run.sink.log_event({"kind": "damaged_model", "step": state.step, "problem": damage})
            say(f"guard: the final model is damaged: {damage}")
        sample_grid(run, cfg.run.dir / "samples.png")
        save_run_panel(run, x, cfg.run.dir / "panel.png")
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
        "tracking_uri": run.sink.uri if run is not None else None,
        "mlflow_run_id": run.sink.run_id if run is not None else None,
        "mlflow_experiment_id": run.sink.experiment_id if run is not None else None,
        "checkpoint": str(latest.resolve()) if latest is not None else None,
        # what the main rank's stream skipped (data/bad_samples in metrics.jsonl: all ranks)
        "bad_samples": dict(run.loader.bad_samples) if run is not None else {},
        "bad_shards": sorted(run.loader.bad_shards) if run is not None else [],
        "battery": battery,
    }
    if run is None:
        if dist.is_main():  # nothing to track with yet: the file alone
            write_summary(cfg.run.dir, summary)
        return summary
    from pipeline.track.model import log_final_model  # the MLflow model of the final weights

    final = (run.model, to_dict(cfg), state.step, cfg.run.dir)
    summary.update(log_final_model(run.sink, cfg.tracking, status, *final))
    run.sink.log_artifact(cfg.run.dir / "config.yaml")
    run.sink.log_summary(summary)
    if run.node_monitor is not None:
        run.node_monitor.finish()
    run.sink.close(status={"finished": "FINISHED", "preempted": "KILLED"}.get(status, "FAILED"))
    if status in ("finished", FINISHED_DAMAGED, "diverged"):
        dist.teardown()
    return summary


FINISHED_DAMAGED = "finished_damaged"


def maybe_battery(model, x: torch.Tensor | None, n_images: int) -> dict:
    """The exploding-inverse battery on the final model (main rank, which holds the val images
    ``x``; no collectives): reconstruction and bpd finiteness on val and off-data inputs, samples
    at T 0.7-2, invertible-mode gradients."""
    if not n_images or x is None:
        return {}
    return exploding_inverse_battery(
        model, x[:n_images], n_images=n_images, n_samples=2 * n_images, n_grad=min(8, n_images)
    )


PANEL_TEMPERATURES, PANEL_IMAGES = (0.5, 0.7, 1.0), 8


def save_run_panel(run: Run, x: torch.Tensor | None, path: Path) -> None:
    """The end-of-run picture (main rank, which holds the val images ``x``), logged as an artifact:
    validation images, their exact reconstructions x -> z -> x (proof of invertibility at a
    glance), and samples at 0.5, 0.7, 1.0."""
    if x is None:
        return
    model, was_training = run.model, run.model.training
    x, n = x[:PANEL_IMAGES], min(PANEL_IMAGES, len(x))
    model.eval()
    try:
        with torch.no_grad():
            x_hat = model.reconstruct(x)
            error = (x_hat - x).abs().max().item()
            generator = torch.Generator(device=x.device).manual_seed(0)
            rows = [
                ("validation images", x),
                (f"their reconstructions x -> z -> x (max |error| {error:.1e})", x_hat),
                *(
                    (f"samples at T = {t}", model.sample(n, temperature=t, generator=generator))
                    for t in PANEL_TEMPERATURES
                ),
            ]
    finally:
        model.train(was_training)
    save_panel(rows, path)
    run.sink.log_artifact(path)


def every(step: int, n: int) -> bool:
    return bool(n) and step % n == 0


def optimum_gap(state: TrainState, metrics: dict) -> dict:
    if state.optimum_bpd is None:
        return {}
    return {
        "theory/optimum_bpd": state.optimum_bpd,
        "theory/gap_bpd": metrics["train/bpd"] - state.optimum_bpd,
    }


def train_step(run: Run, batches) -> tuple[dict, bool, torch.Tensor]:
    """One optimizer step over grad_accum micro-batches, in three parts: forward/backward → skip or
    step (one decision on every rank) → the step's metrics. Returns (metrics, SIGTERM seen on any
    rank, the last micro-batch)."""
    sums, extremes, x = forward_backward(run, batches)
    lr = run.engine.get_lr()[0]  # the LR this step applies
    bounds = certified_range(run.model, x[0].numel())  # of the weights the batch went through
    means, extremes, norms, skipped, counts = skip_or_step(run, sums, extremes)
    run.state.skipped_steps += int(skipped)
    metrics = step_metrics(means, extremes, norms, skipped, lr, bounds)
    metrics["data/bad_samples"] = counts[1].item()  # skipped by the stream, all ranks so far
    return metrics, bool(counts[0] > 0), x


def forward_backward(run: Run, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward over the micro-batches of one step. Returns this rank's sums of
    [bpd, logpz_bpd, logdet_bpd], its extremes [max, -min] of log|det J|/D, and the last batch."""
    engine, cfg, step = run.engine, run.cfg, run.state.step + 1
    accum = cfg.train.grad_accum
    sums = torch.zeros(3, dtype=torch.float64)
    extremes = torch.full((2,), -math.inf, dtype=torch.float64)
    for micro in range(accum):
        x = faults.corrupt_batch(cfg.faults, next(batches), step).to(engine.device)
        with autocast(cfg.train.precision):
            out = engine(x)
        loss = out["bpd"].float().mean()
        engine.backward(loss)
        bits = x[0].numel() * math.log(2.0)
        terms = [loss, -out["logpz"].mean() / bits, -out["logdet"].mean() / bits]
        sums += torch.stack(terms).detach().double().cpu()
        logdet = out["logdet"].detach().double().cpu() / x[0].numel()
        extremes = torch.maximum(extremes, torch.stack([logdet.max(), -logdet.min()]))
        if micro < accum - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
    return sums, extremes, x


def skip_or_step(run: Run, sums: torch.Tensor, extremes: torch.Tensor):
    """The optimizer step, or a skip on every rank if anything is non-finite on any rank.

    The loss terms (with the SIGTERM flag and the stream's bad-sample count riding along) are
    all-reduced after the last backward and before the step, so every rank sees the same numbers
    and takes the same decision. A skip cancels the optimizer's step (SkippableAdamW), which leaves
    weights and Adam moments untouched at every ZeRO stage; at ZeRO 1/2 DeepSpeed's own overflow
    check also refuses non-finite gradients. Returns (mean loss terms, extremes, gradient norms,
    skipped, [ranks that saw SIGTERM, bad samples of all ranks]).
    """
    engine, train_cfg = run.engine, run.cfg.train
    flags = [float(run.preemption.requested), float(sum(run.loader.bad_samples.values()))]
    reduced = dist.all_reduce(torch.cat([sums, torch.tensor(flags, dtype=torch.float64)]))
    means = reduced[:3] / (train_cfg.grad_accum * dist.world_size())
    extremes = dist.all_reduce(extremes, "max")
    norms = grad_norms(engine.module.named_parameters()) if train_cfg.zero_stage == 0 else {}
    skip = not bool(torch.isfinite(means).all()) or not math.isfinite(norms.get("global", 0.0))
    run.optimizer.skip_next = skip
    engine.step()
    if train_cfg.zero_stage > 0:
        norms = {"global": float(engine.get_global_grad_norm() or math.nan)}
        skip = skip or not engine.was_step_applied()
    return means, extremes, norms, skip, reduced[3:]


def step_metrics(means, extremes, norms: dict, skipped: bool, lr: float, bounds: dict) -> dict:
    """The step's metrics; the only producer of train/*, optim/* and stability/logdet_*_per_dim
    (the batch's extremes, which the detector holds to the certified range)."""
    return {
        "train/bpd": means[0].item(),
        "train/logpz_bpd": means[1].item(),
        "train/logdet_bpd": means[2].item(),
        "optim/lr": lr,
        "optim/grad_norm": norms["global"],
        "optim/skipped": float(skipped),
        "stability/logdet_max_per_dim": extremes[0].item(),
        "stability/logdet_min_per_dim": -extremes[1].item(),
        **bounds,
        **{f"optim/grad_norm/{k}": v for k, v in norms.items() if k != "global"},
    }


def certified_range(model, num_dims: int) -> dict:
    """The certified per-dim range of log|det J| from the current parameters (cheap: no data)."""
    lo, hi = model.logdet_bound()
    return {"lipschitz/logdet_lower": lo / num_dims, "lipschitz/logdet_upper": hi / num_dims}


def maybe_diagnose(run: Run, step: int, x: torch.Tensor, saving: bool) -> dict:
    """Flow diagnostics every guard.diagnostics_every steps (on the step's batch, in the run's
    precision), and the sampler check (theory/battery.sampler_check, on the run's fixed val images)
    at those steps and before every save, so a checkpoint whose model no longer inverts or samples
    is never a good one: computed on rank 0, broadcast to all."""
    guard, precision = run.cfg.guard, run.cfg.train.precision
    diagnose = every(step, guard.diagnostics_every)
    check = bool(guard.check_images) and (diagnose or saving)
    if not (diagnose or check):
        return {}
    metrics = {}
    if dist.is_main():
        if diagnose:
            probe = x[: guard.diagnostics_images].nan_to_num()
            with autocast(precision):
                metrics = flow_diagnostics(run.model, probe, power_iters=guard.power_iters, seed=step)
        if check and run.check_images is not None:
            start = time.perf_counter()
            with reuse_weights():  # its four walks normalise the weights once
                metrics.update(sampler_check(run.model, run.check_images))
            metrics["guard/check_seconds"] = time.perf_counter() - start  # its cost, for the record
    return dist.broadcast_object(metrics)


def rollback_target(ckpt_root: Path, state: TrainState, guard: GuardConfig) -> tuple[Path, list]:
    """The checkpoint a rollback restores: the last good one, unless it is the last rollback's
    target and the events came back within ``guard.rollback_window`` steps of that rollback (its
    weights may be damaged: it is marked suspect and the next older good one is used). Events
    later than that are a new excursion, and the steps trained since vouch for the target.
    Returns it and the checkpoints passed over as damaged; DivergenceStop when none is left."""
    damaged = []
    target = checkpoint.find_good(ckpt_root, damaged=damaged)
    repeat = (
        target is not None
        and checkpoint.step_of(target) == state.rollback_step
        and state.step - state.rolled_back_at <= guard.rollback_window
    )
    if repeat and state.rollback_step > 0:  # the initial weights (step 0) cannot be damaged
        checkpoint.mark_suspect(target)
        target = checkpoint.find_good(ckpt_root, before=state.rollback_step, damaged=damaged)
    for bad, problem in damaged:
        say(f"guard: checkpoint {bad} is damaged ({problem}); not a rollback target")
    if target is None:
        raise DivergenceStop(
            f"guard asked for a rollback but {ckpt_root} has no good checkpoint left"
        )
    return target, damaged


def roll_back(
    engine, ckpt_root: Path, state: TrainState, guard: GuardConfig
) -> tuple[Path, list]:
    """Restore the rollback target's weights and optimizer state, cut the LR; the step count and
    data go on. Returns the checkpoint restored and those passed over as damaged (folder, first
    mismatch)."""
    target, damaged = rollback_target(ckpt_root, state, guard)
    checkpoint.load_engine(engine, target)
    state.rollbacks += 1
    state.rollback_step, state.rolled_back_at = checkpoint.step_of(target), state.step
    state.lr_scale *= guard.rollback_lr_factor  # the schedule reads it from the state
    state.recent_events, state.failed_checks = [], 0
    engine.lr_scheduler.last_epoch = state.step - 1
    engine.lr_scheduler.step()
    say(
        f"guard: rolled back to {target.name}, LR scale now {state.lr_scale:g} "
        f"(rollback {state.rollbacks}/{guard.max_rollbacks})"
    )
    return target, damaged


def event_metrics(state: TrainState) -> dict:
    counts = {f"events/{k}": float(v) for k, v in state.event_counts.items()}
    return {
        **counts,
        "guard/rollbacks": float(state.rollbacks),
        "guard/skipped": float(state.skipped_steps),
    }


@torch.no_grad()
def validate(engine, val_loader, train: TrainConfig) -> float:
    """Mean bpd over the val split, every rank its share, reduced: [sum of bpd, count]."""
    engine.eval()
    acc = torch.zeros(2, dtype=torch.float64)
    for i, x in enumerate(val_loader):
        if train.val_batches and i >= train.val_batches:
            break
        with autocast(train.precision):
            bpd = engine(x.to(engine.device))["bpd"].double()
        acc += torch.stack([bpd.sum(), torch.tensor(bpd.numel(), dtype=torch.float64)]).cpu()
    engine.train()
    acc = dist.all_reduce(acc)
    return (acc[0] / acc[1].clamp(min=1)).item()


def sample_grid(run: Run, path: Path) -> None:
    """A grid of samples at train.temperature (main rank), logged as an artifact."""
    if not dist.is_main():
        return
    with torch.no_grad():
        x = run.model.sample(run.cfg.train.samples, temperature=run.cfg.train.temperature)
    save_grid(x, path)
    run.sink.log_artifact(path, "samples" if path.parent.name == "samples" else None)


class Throughput:
    """images/s between log lines, and peak memory."""

    def __init__(self, train: TrainConfig, step: int):
        self.images_per_step = train.micro_batch * train.grad_accum * dist.world_size()
        self.t, self.step = time.perf_counter(), step

    def read(self, step: int) -> dict:
        now = time.perf_counter()
        speed = (step - self.step) * self.images_per_step / max(now - self.t, 1e-9)
        self.t, self.step = now, step
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        return {"speed/images_per_s": speed, "memory/peak_bytes": float(peak)}


def progress_line(state: TrainState, steps: int, m: dict) -> str:
    extra = f"  skipped {state.skipped_steps}" if state.skipped_steps else ""
    extra += f"  rollbacks {state.rollbacks}" if state.rollbacks else ""
    return (
        f"step {state.step:>6}/{steps}  bpd {m['train/bpd']:.4f}  "
        f"grad {m['optim/grad_norm']:.3g}  lr {m['optim/lr']:.2e}{extra}"
    )


def autocast(precision: str):
    """bf16: subnets under torch.autocast; log-dets, prior and loss stay fp32 (docs/design.md §3.5 (6))."""
    if precision == "bf16":
        return torch.autocast(dist.device().type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


