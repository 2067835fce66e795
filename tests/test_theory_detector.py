"""The divergence detector on synthetic metric streams: every injected fault gives its event at its
step, and a clean run gives none (docs/design.md §5)."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from pipeline.theory import DivergenceDetector, Event, GuardConfig
from pipeline.theory.detector import (
    CHECK_BPD,
    CHECK_RECON,
    CHECK_SAMPLES,
    FORWARD_BOUND,
    GRAD_NORM,
    GRAD_NORM_SPIKE,
    INVERSE_BOUND,
    INVERSE_ERR,
    INVERSE_ERROR,
    LOGDET_BOUND,
    LOGDET_JUMP,
    LOGDET_MAX,
    LOGDET_MIN,
    LOGDET_UPPER,
    LOSS,
    LOSS_SPIKE,
    NON_FINITE_GRAD,
    NON_FINITE_LOSS,
    SAMPLER,
    RobustHistory,
)


def clean_run(steps: int = 600, seed: int = 0):
    """A plausible training stream: decaying noisy loss, log-normal gradient norms decaying with a
    warmup bump, log-det inside the certified range, small inverse error."""
    rng = random.Random(seed)
    for step in range(steps):
        yield (
            step,
            {
                LOSS: 3.0 + 2.0 * math.exp(-step / 80) + 0.02 * rng.gauss(0, 1),
                GRAD_NORM: (2.0 + 3.0 * math.exp(-((step - 30) ** 2) / 200))
                * math.exp(-step / 400)
                * math.exp(0.3 * rng.gauss(0, 1)),
                FORWARD_BOUND: 20.0,
                INVERSE_BOUND: 20.0,
                LOGDET_MIN: 0.1 + 0.01 * rng.gauss(0, 1),
                LOGDET_MAX: 0.2 + 0.01 * rng.gauss(0, 1),
                INVERSE_ERR: 1e-6 * (1 + rng.random()),
            },
        )


def run(detector, faults=None, rank=0, steps=600):
    events = []
    for step, metrics in clean_run(steps):
        if faults and step in faults:
            metrics.update(faults[step](metrics))
        events += detector.observe(step, metrics, rank=rank)
    return events


def test_a_clean_run_produces_no_events():
    for seed in range(3):
        detector = DivergenceDetector(GuardConfig())
        events = []
        for step, metrics in clean_run(seed=seed):
            events += detector.observe(step, metrics)
        assert events == []


# below: the event's value lies below its threshold (a lower limit was crossed)
@pytest.mark.parametrize(
    "kind, fault, below",
    [
        (NON_FINITE_LOSS, lambda m: {LOSS: math.nan}, False),
        (NON_FINITE_LOSS, lambda m: {LOSS: math.inf}, False),
        (NON_FINITE_GRAD, lambda m: {GRAD_NORM: math.inf}, False),
        (NON_FINITE_GRAD, lambda m: {GRAD_NORM: math.nan}, False),
        (LOSS_SPIKE, lambda m: {LOSS: m[LOSS] + 0.5}, False),
        (GRAD_NORM_SPIKE, lambda m: {GRAD_NORM: m[GRAD_NORM] * 50}, False),
        # the certified range moves onto the log-dets, which do not move: no jump
        (LOGDET_BOUND, lambda m: {FORWARD_BOUND: math.exp(m[LOGDET_MAX] - 0.01)}, False),
        (LOGDET_BOUND, lambda m: {INVERSE_BOUND: math.exp(-m[LOGDET_MIN] - 0.01)}, True),
        (LOGDET_BOUND, lambda m: {LOGDET_UPPER: 0.15}, False),  # a tighter certificate, violated
        # a blow-up and a collapse of volume change well inside the certified range [-3.0, 3.0]:
        # only the data-driven band sees them
        (LOGDET_JUMP, lambda m: {LOGDET_MAX: m[LOGDET_MAX] + 1.0}, False),
        (LOGDET_JUMP, lambda m: {LOGDET_MIN: m[LOGDET_MIN] - 1.0}, True),
        (INVERSE_ERROR, lambda m: {INVERSE_ERR: 0.05}, False),
        (INVERSE_ERROR, lambda m: {INVERSE_ERR: math.nan}, False),
        (INVERSE_ERROR, lambda m: {CHECK_RECON: 0.05}, False),  # the sampler check's
        (INVERSE_ERROR, lambda m: {CHECK_RECON: math.inf}, False),
        (SAMPLER, lambda m: {CHECK_SAMPLES: 0.25}, False),
        (SAMPLER, lambda m: {CHECK_BPD: 0.75}, False),
    ],
)
def test_each_injected_fault_gives_its_event_at_its_step(kind, fault, below):
    detector = DivergenceDetector(GuardConfig())
    events = run(detector, {300: fault}, rank=5)
    assert [(e.step, e.kind, e.rank) for e in events] == [(300, kind, 5)]
    event = events[0]
    if kind.startswith("non_finite"):
        assert not math.isfinite(event.value) and event.threshold == math.inf
    elif below:
        assert event.value < event.threshold
    else:
        assert event.value > event.threshold or math.isnan(event.value)
    line = json.dumps(event.to_dict(), allow_nan=False)  # strict JSON for events.jsonl
    assert json.loads(line)["kind"] == kind


def test_spike_thresholds_follow_the_noise_not_the_trend():
    """Over the window the decay dwarfs the noise (a plain MAD would be ~10x the noise and miss a
    15σ jump); the step-to-step scale sees the noise: 3σ is no spike, 15σ is."""
    cfg = GuardConfig(loss_spike_z=6.0, min_history=20, loss_spike_floor=0.0)
    detector = DivergenceDetector(cfg)
    rng = random.Random(1)
    sigma = 0.002

    def trend(step):
        return 3.0 + 2.0 * math.exp(-step / 60)

    for step in range(200):
        assert detector.observe(step, {LOSS: trend(step) + sigma * rng.gauss(0, 1)}) == []
    window = list(detector.loss.values)
    median = sorted(window)[len(window) // 2]
    assert sorted(abs(v - median) for v in window)[len(window) // 2] > 5 * sigma
    assert detector.observe(200, {LOSS: trend(200) + 3 * sigma}) == []
    assert [e.kind for e in detector.observe(201, {LOSS: trend(201) + 15 * sigma})] == [LOSS_SPIKE]
    early = DivergenceDetector(cfg)
    assert all(early.observe(s, {LOSS: 1.0 + 10.0 * (s == 5)}) == [] for s in range(19))


def test_state_dict_resumes_exactly():
    faults = {250: lambda m: {LOSS: m[LOSS] + 0.3}, 450: lambda m: {GRAD_NORM: m[GRAD_NORM] * 40}}
    straight = DivergenceDetector(GuardConfig())
    expected = run(straight, faults)
    assert {e.kind for e in expected} == {LOSS_SPIKE, GRAD_NORM_SPIKE}

    first = DivergenceDetector(GuardConfig())
    resumed = DivergenceDetector(GuardConfig())
    events = []
    for step, metrics in clean_run():
        if step in faults:
            metrics.update(faults[step](metrics))
        if step == 300:
            state = json.loads(json.dumps(first.state_dict()))  # as saved with a checkpoint
            resumed.load_state_dict(state)
        detector = first if step < 300 else resumed
        events += detector.observe(step, metrics)
    assert events == expected
    assert resumed.state_dict() == straight.state_dict()


def test_event_to_dict():
    e = Event(step=3, kind=NON_FINITE_LOSS, value=-math.inf, threshold=math.inf, rank=1)
    assert e.to_dict() == {
        "step": 3,
        "kind": NON_FINITE_LOSS,
        "value": "-inf",
        "threshold": "inf",
        "rank": 1,
    }


def test_the_log_det_band_follows_a_steady_rise():
    """Early in training the batch's log-det extremes rise by up to ~0.04 nats/dim a step (the
    demo model at lr 3e-3): a level read as the plain median of the last 10 values lags the curve
    by ~5 steps, beyond the 8·0.02 band, and every step looked like a jump (3 in a row rolled
    back a healthy run). The band follows the slope; a real jump on top of the rise still fires."""
    rng = random.Random(0)

    def curve(step):  # the shape of the demo's log-det maximum over its first 200 steps
        return 2.1 + 1.25 / (1 + math.exp(-(step - 25) / 6)) + 0.02 * rng.gauss(0, 1)

    detector = DivergenceDetector(GuardConfig())
    values = [curve(step) for step in range(200)]
    assert all(detector.observe(s, {LOGDET_MAX: v}) == [] for s, v in enumerate(values))
    plain = RobustHistory(100, 10, 20, floor=0.02, relative_floor=False)
    lagged = 0
    for v in values:
        lagged += (limit := plain.threshold(8.0)) is not None and v > limit
        plain.push(v)
    assert lagged >= 3  # the same curve against the untrended level: a rollback's worth
    jump = [e.kind for e in detector.observe(200, {LOGDET_MAX: curve(200) + 0.5})]
    assert jump == [LOGDET_JUMP]


# The batch's log|det J|/D maximum over the first 40 steps of a demo-shaped run (4 levels × 5
# steps, width 48, 2 ranks × 16 images, lr 2.5e-3 with a 100-step warm-up; per-step metrics of
# `launch/local.sh ... train.log_every=1`): it falls for 10 steps, then turns and rises by
# 0.03-0.05 a step as the LR grows.
DEMO_WARMUP_LOGDET_MAX = [
    2.2814, 2.2795, 2.2763, 2.2708, 2.2643, 2.2562, 2.2501, 2.2378, 2.2328, 2.2249,
    2.2263, 2.2301, 2.2266, 2.2469, 2.2568, 2.2681, 2.2955, 2.3163, 2.3522, 2.4098,
    2.4354, 2.4829, 2.4863, 2.4878, 2.5474, 2.5622, 2.5807, 2.669, 2.6898, 2.7355,
    2.6942, 2.7378, 2.7445, 2.7785, 2.7984, 2.8596, 2.8062, 2.8659, 2.8509, 2.9298,
]  # fmt: skip


def test_the_log_det_band_follows_a_curve_that_turns():
    """A slope read from the medians of the last two windows saw this V as flat and raised jumps
    at steps 21 and 22 (one short of a rollback to step 0); the robust line through the last 10
    values follows the turn, and a jump on top of the rise still fires."""
    detector = DivergenceDetector(GuardConfig())
    for step, value in enumerate(DEMO_WARMUP_LOGDET_MAX, start=1):
        assert detector.observe(step, {LOGDET_MAX: value}) == [], step
    on_trend = DEMO_WARMUP_LOGDET_MAX[-1] + 0.05  # the next step's value were the rise to go on
    jump = detector.observe(41, {LOGDET_MAX: on_trend + 0.3})
    assert [e.kind for e in jump] == [LOGDET_JUMP]


def test_the_trend_level_is_the_robust_line_through_the_last_values():
    history = RobustHistory(100, 10, 20, floor=0.02, relative_floor=False, trend=True)
    line = [1.0 + 0.25 * i for i in range(10)]
    assert history.level(line) == pytest.approx(1.0 + 0.25 * 10)
    outlier = [*line[:-1], 100.0]  # one wild value moves neither the slope nor the intercept
    assert history.level(outlier) == pytest.approx(1.0 + 0.25 * 10)
    flat = RobustHistory(100, 10, 20, floor=0.02, relative_floor=False)
    assert flat.level(line) == pytest.approx(statistics.median(line))
