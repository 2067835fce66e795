"""The divergence guard: the detector's events -> skip, roll back and cut the LR, or stop.

Every input the guard sees has been all-reduced (loss, gradient norm) or broadcast from rank 0 (flow
diagnostics), so every rank holds the same detector and reaches the same decision without talking:
no rank is ever left waiting in a collective that the others skipped.

Policy (thresholds and escalation both in cfg.guard):
  - a step whose loss or gradient is non-finite on any rank is skipped on every rank;
  - ``rollback_events`` steps with events within ``rollback_window`` steps: restore the last good
    checkpoint (saved with no event in its window), multiply the LR by ``rollback_lr_factor``; the
    data stream moves on, so the batches that led to the divergence are not replayed. If events
    recur within ``rollback_window`` steps of a rollback, before a newer good checkpoint exists,
    the last target is marked bad (it may hold weights already damaged by a step whose loss was
    still finite) and the next older one is used (train/loop.rollback_target);
  - inverse-error or sampler events (MODEL_KINDS: the model no longer inverts or samples) at
    ``diagnostic_events`` checks in a row (diagnostics and checkpoint steps, where alone they are
    measured): roll back as above, however few steps had events. They come every 25-100 steps,
    too sparse to make the step-event count, and one damaging step can leave a model whose loss
    looks fine and whose sampler overflows;
  - a rollback beyond ``max_rollbacks``: stop (``DivergenceStop``); the loop writes the run's
    summary.json with status "diverged" and the last events.
"""

from __future__ import annotations

from pipeline import distributed as dist
from pipeline.theory.config import GuardConfig
from pipeline.theory.detector import CHECKED, MODEL_KINDS, DivergenceDetector, Event
from pipeline.train.state import TrainState

OK, ROLLBACK, STOP = "ok", "rollback", "stop"


class DivergenceStop(RuntimeError):
    """Raised (on every rank alike) when the guard has run out of rollbacks; ``events`` are the
    last step's events, as dicts, for the run's summary."""

    def __init__(self, message: str, events: list[dict] | None = None):
        super().__init__(message)
        self.events = events or []


class Guard:
    def __init__(self, cfg: GuardConfig, state: TrainState, precision: str = "fp32"):
        self.cfg = cfg
        self.detector = DivergenceDetector(cfg, precision)
        if state.detector:
            self.detector.load_state_dict(state.detector)

    def observe(self, state: TrainState, metrics: dict) -> tuple[list[Event], str]:
        """Record this step's events in ``state``; return them and the action to take. A step
        whose metrics measured the model's inverse or sampler (CHECKED) and raised no MODEL_KINDS
        event ends the run of failed checks."""
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

    def rolled_back(self, state: TrainState, histories: dict) -> None:
        """After a rollback: the detector's curves go back to ``histories``, the target
        checkpoint's (its TrainState.detector). Against the diverged run's history the restored
        weights look like a jump (log-dets) or a spike (a rollback to step 0 brings back the
        initial loss): each check would roll back again until the rollbacks ran out."""
        self.detector.restore_histories(histories)
        state.detector = self.detector.state_dict()
