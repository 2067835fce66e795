"""The guard's policy on synthetic metrics (train/guard.py): failed model checks escalate on their
own, the inverse tolerance follows the precision, and a resume of a checkpoint saved before the
bounded prior keeps the prior it was trained with (docs/design.md §5)."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import ConfigError, load_config, load_saved_config, save_config
from pipeline.theory import DivergenceDetector, GuardConfig
from pipeline.theory.detector import CHECK_RECON, CHECK_SAMPLES, INVERSE_ERR, LOSS
from pipeline.train import compat
from pipeline.train.guard import OK, ROLLBACK, STOP, Guard
from pipeline.train.state import TrainState
from tests.conftest import ROOT

HEALTHY = {CHECK_RECON: 1e-6, CHECK_SAMPLES: 0.0}
BROKEN = {CHECK_RECON: 1e-6, CHECK_SAMPLES: 1.0}


def actions(guard: Guard, state: TrainState, checks: dict[int, dict]) -> list[tuple[int, str]]:
    """(step, action) at every step that is not OK; the loss is flat and checks come at the
    given steps, as at save and diagnostics steps."""
    out = []
    for step in range(1, 101):
        state.step = step
        _, action = guard.observe(state, {LOSS: 3.0, **checks.get(step, {})})
        if action != OK:
            out.append((step, action))
            state.rollbacks += action == ROLLBACK
            state.recent_events, state.failed_checks = [], 0  # as Guard.roll_back does
    return out


def test_failed_checks_in_a_row_roll_back_alone_and_a_passing_check_resets_them():
    state = TrainState()
    checks = {25: BROKEN, 50: HEALTHY, 75: BROKEN}  # never two in a row
    assert actions(Guard(GuardConfig(), state), state, checks) == []
    assert state.event_counts == {"sampler": 2}
    state = TrainState()
    checks = {25: BROKEN, 50: BROKEN, 60: BROKEN, 70: BROKEN}  # 2 event steps: too few for steps
    assert actions(Guard(GuardConfig(), state), state, checks) == [(50, ROLLBACK), (70, ROLLBACK)]
    state = TrainState()
    guard = Guard(GuardConfig(max_rollbacks=1, diagnostic_events=3), state)
    checks = {s: BROKEN for s in (10, 20, 30, 40, 50, 60)}
    assert actions(guard, state, checks) == [(30, ROLLBACK), (60, STOP)]


def test_the_inverse_tolerance_follows_the_precision():
    """bf16 autocast alone leaves ~1e-2 of inverse error in the diagnostics: no event there, while
    the sampler check (always float32) keeps the fp32 tolerance."""
    for precision, kinds in (("fp32", ["inverse_error"]), ("bf16", [])):
        guard = Guard(GuardConfig(), TrainState(), precision)
        events, _ = guard.observe(TrainState(step=1), {INVERSE_ERR: 1e-2})
        assert [e.kind for e in events] == kinds
    guard = Guard(GuardConfig(), TrainState(), "bf16")
    events, _ = guard.observe(TrainState(step=1), {CHECK_RECON: 1e-2})
    assert [e.kind for e in events] == ["inverse_error"]


def test_a_checkpoint_saved_before_the_bounded_prior_loads_and_resumes_unbounded(tmp_path):
    cfg = load_config(ROOT / "configs/debug.yaml")
    save_config(cfg, tmp_path / "config.yaml")
    tree = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del tree["model"]["prior_log_std_bound"]  # as every checkpoint before issue 22 was saved
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    assert load_saved_config(tmp_path / "config.yaml").model.prior_log_std_bound == 0.0
    assert cfg.model.prior_log_std_bound == 8.0  # a new run's default
    same = load_config(ROOT / "configs/debug.yaml", ["model.prior_log_std_bound=0"])
    assert compat.check_resume(tmp_path, same, world_size=1, saved_world_size=1) == []
    with pytest.raises(ConfigError, match=r"model\.prior_log_std_bound: 0\.0 -> 8\.0"):
        compat.check_resume(tmp_path, cfg, world_size=1, saved_world_size=1)


def test_a_rollback_restores_the_targets_histories():
    """The restored weights' curves are the target checkpoint's: compared with the history the
    divergence left, their log-dets would look like a jump, and after a rollback to step 0 the
    initial loss like a spike, and the guard would roll back again until its rollbacks ran out
    (both seen: the stability study before the band was restarted, the demo at lr 3e-3 before
    the histories were restored)."""
    from pipeline.theory.detector import LOGDET_MAX, LOGDET_MIN

    def healthy(step: int) -> dict:
        return {LOSS: 4.0 - 0.01 * step, LOGDET_MAX: 2.0, LOGDET_MIN: 1.0}

    state = TrainState()
    guard = Guard(GuardConfig(min_history=5), state)
    for step in range(1, 11):
        state.step = step
        assert guard.observe(state, healthy(step)) == ([], OK)
    saved = dict(state.detector)  # the checkpoint at step 10
    for step in range(11, 41):  # a collapse: the extremes settle far below the healthy ones
        state.step = step
        guard.observe(state, {LOSS: 2.0, LOGDET_MAX: -3.0 - 1e-3 * step, LOGDET_MIN: -4.0})
    jumped = DivergenceDetector(GuardConfig(min_history=5))
    jumped.load_state_dict(state.detector)
    assert {e.kind for e in jumped.observe(41, healthy(11))} == {"logdet_jump", "loss_spike"}
    counts = dict(state.event_counts)
    state.recent_events, state.failed_checks = [], 0  # as Guard.roll_back does
    guard.rolled_back(state, saved)
    state.step = 41
    assert guard.observe(state, healthy(11)) == ([], OK)
    assert state.event_counts == counts  # the events seen stay counted
    restored = DivergenceDetector(GuardConfig(min_history=5))
    restored.load_state_dict(state.detector)  # and a resume after the rollback knows it
    assert list(restored.logdet_max.values) == [2.0] * 11
    guard.rolled_back(state, {})  # to step 0: nothing known yet, no verdict for min_history steps
    for step in range(42, 47):
        state.step = step
        assert guard.observe(state, healthy(0)) == ([], OK)
