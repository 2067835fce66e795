"""Divergence detector: turns per-step metrics into structured events (docs/design.md §5).

``DivergenceDetector(cfg).observe(step, metrics, rank)`` returns a list of ``Event(step, kind,
value, threshold, rank)``; it decides nothing about the response (skip, roll back, cut LR: the guard
in pipeline/train does). Metrics are read by their docs/design.md §6 names; absent ones are simply not
checked:

    train/bpd                        loss: non-finite -> non_finite_loss; spike -> loss_spike
    optim/grad_norm                  non-finite -> non_finite_grad; spike -> grad_norm_spike
    stability/logdet_min_per_dim,    log|det J|/D outside the certified range (± logdet_slack)
    stability/logdet_max_per_dim     -> logdet_bound. The range is [-ln L_inv, ln L] from
                                     lipschitz/forward_bound (L) and lipschitz/inverse_bound
                                     (L_inv), narrowed by lipschitz/logdet_lower and
                                     lipschitz/logdet_upper (per dim) when given
    stability/logdet_min_per_dim,    a sudden jump of the batch's extremes against their own
    stability/logdet_max_per_dim     recent history (robust z-score as below, with a level that
                                     follows the curve's slope and the noise of the last
                                     2·level_window steps; one-sided: the maximum rising =
                                     blow-up, the minimum falling = collapse) -> logdet_jump
    stability/inverse_error          > the precision's tolerance (inverse_tol in fp32,
                                     inverse_tol_bf16 under bf16 autocast) or non-finite
                                     -> inverse_error
    check/recon_error                the sampler check's (theory/battery.py, always float32)
                                     > inverse_tol or non-finite -> inverse_error
    check/sample_nonfinite_frac,     a non-finite sample at T = 1, or a non-finite bpd on the
    check/bpd_finite_frac            check's fixed validation images -> sampler

Which check fires when: the certified range catches a log-det no weights of this model could
produce (a bug, or float overflow); on a trained model the composed range is astronomically wide
(~10^20), so it is the jump check that sees a volume change collapse or blow up within that range.
The inverse-error and sampler events come only at diagnostics and checkpoint steps; the guard
escalates them on their own (``diagnostic_events`` in a row).

Spikes use a robust z-score against recent history, z = (v - level) / scale, one-sided (only rises
alarm), after ``min_history`` values: level = median of the last ``level_window`` values, and
scale = 1.4826·median|v_i - v_{i-1}|/√2 over the last ``window`` values (the median absolute
successive difference), which estimates the step-to-step noise without being inflated by the trend
every training curve has (a plain MAD of a decaying loss or gradient norm mostly measures the
decay). A floor keeps flat curves from turning noise into spikes: relative to |level| for the loss,
in log units for the gradient norm, which is scored on a log scale because norms are positive and
heavy-tailed. A non-finite value's event has threshold inf (the value had to be finite). All
finite values enter the history, spikes included: medians shrug off isolated spikes, and a genuine
level shift (e.g. a new learning rate) is absorbed instead of alarming forever. The history is part
of the guard state: save ``state_dict()`` with the checkpoint so a resumed run decides the same.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipeline.io import json_safe
from pipeline.theory.config import GuardConfig
from pipeline.theory.diagnostics import certified_logdet_range

NON_FINITE_LOSS = "non_finite_loss"
NON_FINITE_GRAD = "non_finite_grad"
LOSS_SPIKE = "loss_spike"
GRAD_NORM_SPIKE = "grad_norm_spike"
LOGDET_BOUND = "logdet_bound"
LOGDET_JUMP = "logdet_jump"
INVERSE_ERROR = "inverse_error"
SAMPLER = "sampler"
# the kinds that say the model no longer inverts or samples: seen only at diagnostics and
# checkpoint steps, escalated by the guard on their own
MODEL_KINDS = (INVERSE_ERROR, SAMPLER)

LOSS = "train/bpd"
GRAD_NORM = "optim/grad_norm"
LOGDET_MIN = "stability/logdet_min_per_dim"
LOGDET_MAX = "stability/logdet_max_per_dim"
FORWARD_BOUND = "lipschitz/forward_bound"
INVERSE_BOUND = "lipschitz/inverse_bound"
LOGDET_LOWER = "lipschitz/logdet_lower"
LOGDET_UPPER = "lipschitz/logdet_upper"
INVERSE_ERR = "stability/inverse_error"
CHECK_RECON = "check/recon_error"
CHECK_SAMPLES = "check/sample_nonfinite_frac"
CHECK_BPD = "check/bpd_finite_frac"
CHECKED = (INVERSE_ERR, CHECK_RECON)  # present: this step measured the inverse (MODEL_KINDS)

MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass(frozen=True)
class Event:
    step: int
    kind: str
    value: float
    threshold: float
    rank: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite floats as "nan"/"inf"/"-inf"), one line of events.jsonl."""
        return json_safe(asdict(self))


class RobustHistory:
    """The last ``window`` finite values and a one-sided robust threshold level + z·scale.

    With ``trend``, the level follows the curve: the Theil-Sen line through the last
    ``level_window`` values (the median of their pairwise slopes; the intercept the median of the
    values less that slope), read at the next step. A plain median lags a steadily moving curve by
    about level_window/2 steps, and early in training the log-det extremes rise fast enough for
    that lag alone to cross the band. The line uses only the last level_window values because the
    curve turns (in the warm-up it first falls, then rises as the LR grows); a slope read over a
    longer span takes such a V for flat. The noise scale then comes from the last
    2·level_window values: early steps change faster than the flat start the window still holds."""

    def __init__(
        self,
        window: int,
        level_window: int,
        min_history: int,
        floor: float,
        relative_floor: bool,
        trend: bool = False,
    ):
        self.values: deque[float] = deque(maxlen=max(window, 2))
        self.level_window = max(level_window, 1)
        self.min_history = max(min_history, 2)
        self.floor = floor
        self.relative_floor = relative_floor
        self.trend = trend

    def level(self, values: list[float]) -> float:
        recent = values[-self.level_window :]
        if not self.trend or len(recent) < 2:
            return statistics.median(recent)
        slope = statistics.median(
            (b - a) / (j - i) for i, a in enumerate(recent) for j, b in enumerate(recent) if j > i
        )
        intercept = statistics.median(v - slope * i for i, v in enumerate(recent))
        return intercept + slope * len(recent)

    def threshold(self, z: float) -> float | None:
        """None until ``min_history`` values are known."""
        if len(self.values) < self.min_history:
            return None
        values = list(self.values)
        level = self.level(values)
        if self.trend:  # the noise of the same span as the level's: the curve's phase changes fast
            values = values[-2 * self.level_window :]
        steps = [abs(b - a) for a, b in zip(values, values[1:])]
        scale = MAD_TO_STD * statistics.median(steps) / math.sqrt(2.0)
        floor = self.floor * abs(level) if self.relative_floor else self.floor
        return level + z * max(scale, floor, 1e-12)

    def push(self, value: float) -> None:
        self.values.append(value)


def _scalar(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().to(torch.float64).reshape(()))
    return float(value)


class DivergenceDetector:
    """Per-rank divergence checks over a stream of metrics (see the module docstring)."""

    def __init__(self, cfg: GuardConfig | None = None, precision: str = "fp32"):
        self.cfg = cfg or GuardConfig()
        cfg = self.cfg
        self.inverse_tol = cfg.inverse_tol_bf16 if precision == "bf16" else cfg.inverse_tol
        self.loss = RobustHistory(
            cfg.window, cfg.level_window, cfg.min_history, cfg.loss_spike_floor, relative_floor=True
        )
        self.log_grad = RobustHistory(
            cfg.window,
            cfg.level_window,
            cfg.min_history,
            cfg.grad_spike_floor,
            relative_floor=False,
        )
        jump = (cfg.window, cfg.level_window, cfg.min_history, cfg.logdet_jump_floor)
        self.logdet_max = RobustHistory(*jump, relative_floor=False, trend=True)
        self.logdet_neg_min = RobustHistory(
            *jump, relative_floor=False, trend=True
        )  # collapse rises

    def observe(self, step: int, metrics: dict[str, Any], rank: int = 0) -> list[Event]:
        """Check one step's metrics; return its events (empty for a healthy step). Counting them
        is the caller's: the guard keeps the run's one tally in its TrainState."""
        cfg = self.cfg
        events: list[Event] = []

        def emit(kind: str, value: float, threshold: float) -> None:
            events.append(Event(int(step), kind, float(value), float(threshold), int(rank)))

        if LOSS in metrics:
            loss = _scalar(metrics[LOSS])
            if not math.isfinite(loss):
                emit(NON_FINITE_LOSS, loss, math.inf)
            else:
                limit = self.loss.threshold(cfg.loss_spike_z)
                if limit is not None and loss > limit:
                    emit(LOSS_SPIKE, loss, limit)
                self.loss.push(loss)

        if GRAD_NORM in metrics:
            norm = _scalar(metrics[GRAD_NORM])
            if not math.isfinite(norm):
                emit(NON_FINITE_GRAD, norm, math.inf)
            elif norm > 0:
                limit = self.log_grad.threshold(cfg.grad_spike_z)
                if limit is not None and math.log(norm) > limit:
                    emit(GRAD_NORM_SPIKE, norm, math.exp(limit))
                self.log_grad.push(math.log(norm))

        lo, hi = -math.inf, math.inf
        if FORWARD_BOUND in metrics and INVERSE_BOUND in metrics:
            lo, hi = certified_logdet_range(
                _scalar(metrics[FORWARD_BOUND]), _scalar(metrics[INVERSE_BOUND])
            )
        if LOGDET_LOWER in metrics:
            lo = max(lo, _scalar(metrics[LOGDET_LOWER]))
        if LOGDET_UPPER in metrics:
            hi = min(hi, _scalar(metrics[LOGDET_UPPER]))
        if LOGDET_MAX in metrics and math.isfinite(hi):
            top = _scalar(metrics[LOGDET_MAX])
            if top > hi + cfg.logdet_slack:
                emit(LOGDET_BOUND, top, hi + cfg.logdet_slack)
        if LOGDET_MIN in metrics and math.isfinite(lo):
            bottom = _scalar(metrics[LOGDET_MIN])
            if bottom < lo - cfg.logdet_slack:
                emit(LOGDET_BOUND, bottom, lo - cfg.logdet_slack)

        for key, history, sign in (
            (LOGDET_MAX, self.logdet_max, 1.0),
            (LOGDET_MIN, self.logdet_neg_min, -1.0),
        ):
            if key in metrics and math.isfinite(value := sign * _scalar(metrics[key])):
                limit = history.threshold(cfg.logdet_jump_z)
                if limit is not None and value > limit:
                    emit(LOGDET_JUMP, sign * value, sign * limit)
                history.push(value)

        for key, tol in ((INVERSE_ERR, self.inverse_tol), (CHECK_RECON, cfg.inverse_tol)):
            if key in metrics:
                err = _scalar(metrics[key])
                if not err <= tol:  # also catches nan
                    emit(INVERSE_ERROR, err, tol)
        if CHECK_SAMPLES in metrics and (bad := _scalar(metrics[CHECK_SAMPLES])) > 0:
            emit(SAMPLER, bad, 0.0)
        if CHECK_BPD in metrics and (finite := _scalar(metrics[CHECK_BPD])) < 1:
            emit(SAMPLER, 1.0 - finite, 0.0)

        return events

    HISTORIES = ("loss", "log_grad", "logdet_max", "logdet_neg_min")

    def state_dict(self) -> dict[str, Any]:
        return {name: list(getattr(self, name).values) for name in self.HISTORIES}

    def restore_histories(self, state: dict[str, Any]) -> None:
        """The curves' histories as a ``state_dict`` saved them; an absent one starts empty (an
        empty dict: nothing known yet; older checkpoints lack the log-det bands and carry a
        "counts" entry, which is not a history). A rollback restores the target checkpoint's
        histories: the restored model is compared with the curves that led to it, not with the
        divergence."""
        for name in self.HISTORIES:
            history = getattr(self, name).values
            history.clear()
            history.extend(float(v) for v in state.get(name, []))

    load_state_dict = restore_histories
