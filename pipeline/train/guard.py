"""The divergence guard: it measures the model when a check is due, turns the step's metrics into
events (theory/detector.py), decides, and carries the decision out (docs/design.md §5). The loop
asks it once per step: ``guard.step(run, metrics, x, saving)`` -> OK or ROLLED_BACK, or
DivergenceStop.

Every input the guard decides on has been all-reduced (loss, gradient norm) or broadcast from
rank 0 (its model checks), so every rank holds the same detector and reaches the same decision
without talking: no rank is ever left waiting in a collective that the others skipped.

Policy (thresholds and escalation both in cfg.guard):
  - a step whose loss or gradient is non-finite on any rank is skipped on every rank (``skips``,
    asked by the step, train/step.py, before the optimizer moves);
  - ``rollback_events`` steps with events within ``rollback_window`` steps: restore the last good
    checkpoint (saved with no event in its window), multiply the LR by ``rollback_lr_factor``; the
    data stream moves on, so the batches that led to the divergence are not replayed. If events
    recur within ``rollback_window`` steps of a rollback to the same target, that target is marked
    bad (it may hold weights already damaged by a step whose loss was still finite) and the next
    older one is used; events later than that are a new excursion, and the steps trained since
    vouch for the target;
  - inverse-error or sampler events (MODEL_KINDS: the model no longer inverts or samples) at
    ``diagnostic_events`` checks in a row: roll back as above, however few steps had events.
    They are measured only at diagnostics steps and before every save, too sparse to make the
    step-event count, and one damaging step can leave a model whose loss looks fine and whose
    sampler overflows;
  - a rollback beyond ``max_rollbacks``: stop (``DivergenceStop``); the run's outcome is
    "diverged" with the last events.

A rollback gives the detector back the target checkpoint's histories: compared with the diverged
run's, the restored weights look like a jump (log-dets) or a spike (a rollback to step 0 brings
back the initial loss), and each check would roll back again until the rollbacks ran out.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from pipeline import distributed as dist
from pipeline.flows.base import reuse_weights
from pipeline.theory.battery import sampler_check
from pipeline.theory.config import GuardConfig
from pipeline.theory.detector import CHECKED, MODEL_KINDS, DivergenceDetector, Event
from pipeline.theory.diagnostics import flow_diagnostics
from pipeline.train import checkpoint
from pipeline.train.state import TrainState
from pipeline.train.step import autocast

OK, ROLLBACK, STOP = "ok", "rollback", "stop"
ROLLED_BACK = "rolled_back"


class DivergenceStop(RuntimeError):
    """Raised (on every rank alike) when the guard has run out of rollbacks; ``events`` are the
    last step's events, as dicts, for the run's summary."""

    def __init__(self, message: str, events: list[dict] | None = None):
        super().__init__(message)
        self.events = events or []


class Guard:
    def __init__(self, cfg: GuardConfig, state: TrainState, precision: str = "fp32"):
        self.cfg = cfg
        self.precision = precision
        self.detector = DivergenceDetector(cfg, precision)
        if state.detector:
            self.detector.load_state_dict(state.detector)

    def skips(self, loss_terms: torch.Tensor, grad_norm: float) -> bool:
        """Whether this optimizer step is skipped, on every rank alike: the all-reduced loss terms
        or the gradient norm are not finite (bf16 does not skip bad steps by itself)."""
        return not bool(torch.isfinite(loss_terms).all()) or not math.isfinite(grad_norm)

    def step(self, run, metrics: dict, x, saving: bool) -> str:
        """One step's guard: add the model checks due at this step to ``metrics``, record the
        events, then roll back (ROLLED_BACK) or stop (DivergenceStop) if the policy says so."""
        metrics.update(self.measure(run, x, saving))
        events, action = self.observe(run.state, metrics)
        for event in events:
            run.sink.log_event(event.to_dict(), run.state.event_counts)
            dist.say(
                f"guard: step {event.step} {event.kind} value {event.value:.4g} "
                f"threshold {event.threshold:.4g}"
            )
        if action == STOP:
            stop = f"diverged after {run.state.rollbacks} rollbacks"
            raise DivergenceStop(stop, [e.to_dict() for e in events])
        if action == ROLLBACK:
            try:
                self.roll_back(run)
            except DivergenceStop as stop:
                raise DivergenceStop(str(stop), [e.to_dict() for e in events]) from None
            return ROLLED_BACK
        return OK

    def measure(self, run, x, saving: bool) -> dict:
        """Flow diagnostics every guard.diagnostics_every steps (on the step's batch, in the run's
        precision), and the sampler check (theory/battery.sampler_check, on the run's fixed val
        images) at those steps and before every save, so a checkpoint whose model no longer
        inverts or samples is never a good one: computed on rank 0, broadcast to all."""
        cfg, step = self.cfg, run.state.step
        diagnose = bool(cfg.diagnostics_every) and step % cfg.diagnostics_every == 0
        check = bool(cfg.check_images) and (diagnose or saving)
        if not (diagnose or check):
            return {}
        metrics = {}
        if dist.is_main():
            if diagnose:
                probe = x[: cfg.diagnostics_images].nan_to_num()
                with autocast(self.precision):
                    metrics = flow_diagnostics(
                        run.model, probe, power_iters=cfg.power_iters, seed=step
                    )
            if check and run.val_images is not None:
                start = time.perf_counter()
                with reuse_weights():  # its four walks normalise the weights once
                    metrics.update(sampler_check(run.model, run.val_images[: cfg.check_images]))
                metrics["guard/check_seconds"] = time.perf_counter() - start
        return dist.broadcast_object(metrics)

    def observe(self, state: TrainState, metrics: dict) -> tuple[list[Event], str]:
        """Count this step's events in ``state`` (the run's one tally); return them and the action
        the policy asks for. A step whose metrics measured the model's inverse or sampler (CHECKED)
        and raised no MODEL_KINDS event ends the run of failed checks."""
        events = self.detector.observe(state.step, metrics, rank=dist.rank())
        for event in events:
            state.event_counts[event.kind] = state.event_counts.get(event.kind, 0) + 1
        if events:  # one bad step often raises several events (loss and gradient): count steps
            state.recent_events.append(state.step)
        if any(key in metrics for key in CHECKED):
            bad_model = any(event.kind in MODEL_KINDS for event in events)
            state.failed_checks = state.failed_checks + 1 if bad_model else 0
        horizon = state.step - self.cfg.rollback_window
        state.recent_events = [s for s in state.recent_events if s > horizon]
        state.detector = self.detector.state_dict()
        if (
            len(state.recent_events) < self.cfg.rollback_events
            and state.failed_checks < self.cfg.diagnostic_events
        ):
            return events, OK
        return events, STOP if state.rollbacks >= self.cfg.max_rollbacks else ROLLBACK

    def roll_back(self, run) -> Path:
        """Restore the target's weights and optimizer state (every rank: a collective), cut the LR,
        give the detector the target's histories; the step count and data go on."""
        state, engine = run.state, run.engine
        damaged = []
        target = rollback_target(run.ckpt_root, state, self.cfg, damaged)
        for folder, problem in damaged:
            dist.say(f"guard: checkpoint {folder} is damaged ({problem}); not a rollback target")
            run.event("checkpoint_damaged", checkpoint=str(folder), problem=problem)
        checkpoint.load_engine(engine, target)
        state.rollbacks += 1
        state.rollback_step, state.rolled_back_at = checkpoint.step_of(target), state.step
        state.lr_scale *= self.cfg.rollback_lr_factor  # the schedule reads it from the state
        state.recent_events, state.failed_checks = [], 0
        engine.lr_scheduler.last_epoch = state.step - 1
        engine.lr_scheduler.step()
        self.rolled_back(state, checkpoint.read_state(target).detector)
        dist.say(
            f"guard: rolled back to {target.name}, LR scale now {state.lr_scale:g} "
            f"(rollback {state.rollbacks}/{self.cfg.max_rollbacks})"
        )
        return target

    def rolled_back(self, state: TrainState, histories: dict) -> None:
        """The detector's curves go back to ``histories`` (a checkpoint's TrainState.detector)."""
        self.detector.restore_histories(histories)
        state.detector = self.detector.state_dict()


def rollback_target(
    ckpt_root: Path, state: TrainState, cfg: GuardConfig, damaged: list | None = None
) -> Path:
    """The checkpoint a rollback restores: the last good one, unless it is the last rollback's
    target and the events came back within ``cfg.rollback_window`` steps of that rollback (then
    it is marked suspect and the next older good one is used). Checkpoints passed over for a
    mismatch with their manifest are appended to ``damaged``; DivergenceStop when none is left."""
    damaged = [] if damaged is None else damaged
    target = checkpoint.find_good(ckpt_root, damaged=damaged)
    repeat = (
        target is not None
        and checkpoint.step_of(target) == state.rollback_step
        and state.step - state.rolled_back_at <= cfg.rollback_window
    )
    if repeat and state.rollback_step > 0:  # the initial weights (step 0) cannot be damaged
        checkpoint.mark_suspect(target)
        target = checkpoint.find_good(ckpt_root, before=state.rollback_step, damaged=damaged)
    if target is None:
        raise DivergenceStop(
            f"guard asked for a rollback but {ckpt_root} has no good checkpoint left"
        )
    return target
