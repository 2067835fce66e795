"""The step's certificate (pipeline/train/certificate.py): its plan, what it costs, and, on 2 CPU
ranks, a training run bit for bit the same shared or not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.flows import ModelConfig, build_flow
from pipeline.train.certificate import Certificate, assign, split
from tests.conftest import launch_two_ranks


def test_assign_balances_greedily_and_deterministically():
    assert assign([5.0, 3.0, 3.0, 2.0, 1.0], 2) == [0, 1, 1, 0, 1]  # loads 7 and 7
    assert assign([1.0, 1.0, 1.0], 4) == [0, 1, 2]  # a rank may own nothing
    assert assign([], 3) == []


def test_groups_above_a_fair_share_are_sliced():
    assert split([6.0, 1.0, 1.0], [4, 4, 4], world=2) == [
        (0, 0, 2),
        (0, 2, 4),
        (1, 0, 4),
        (2, 0, 4),
    ]
    assert split([9.0, 1.0], [2, 3], world=4) == [(0, 0, 1), (0, 1, 2), (1, 0, 3)]  # ≥ 1 conv
    assert split([1.0, 1.0], [2, 2], world=1) == [(0, 0, 2), (1, 0, 2)]


def test_the_gather_s_bytes_come_from_shapes():
    model = build_flow(ModelConfig(levels=2, steps=2, width=16), (3, 16, 16), 5)
    groups = model.normalised_groups()
    unshared = Certificate(model, share=True, world=1)
    assert unshared.owners is None and unshared.buffer_bytes() == 0
    shared = Certificate(model, share=True, world=2)
    numels = [0, 0]
    units = [groups[g][a:b] for g, a, b in shared.units]
    assert sum(map(len, units)) == sum(map(len, groups))
    for owner, convs in zip(shared.owners, units, strict=True):
        # Fourier: phases [B, 9] and direction [B, m] complex, factor [B], vectors [B, F, m, 2]
        n_freq, m = convs[0].normaliser.state_shape[:2]
        b = len(convs)
        numels[owner] += b * (2 * 9 + 2 * m + 1 + n_freq * m * 2)
    assert shared.buffer_bytes() == 4 * max(numels)
    assert "one all_gather per step" in shared.describe()


def metric_rows(summary: dict) -> list[dict]:
    """The run's metric rows without what the clock or the allocator decides."""
    rows = [
        json.loads(r) for r in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    timing = ("time", "speed/", "memory/", "guard/check_seconds")
    return [{k: v for k, v in row.items() if not k.startswith(timing)} for row in rows]


@pytest.mark.slow
def test_shared_and_unshared_certificates_train_bit_for_bit_alike(tmp_path):
    """20 steps on 2 ranks with 2 micro-batches per step (ZeRO 0: per-level gradient norms every
    step): losses, gradient norms, log-det extremes, validation and the final weights and
    warm-start vectors are the same bits whether the ranks share the certificates or not."""
    runs = {}
    for share, port in (("true", 29661), ("false", 29662)):
        summary, stdout = launch_two_ranks(
            tmp_path / share,
            port,
            "train.steps=20",
            "train.grad_accum=2",
            "train.save_every=10",
            "train.optimum_images=0",
            "guard.battery_images=0",
            f"train.share_certificate={share}",
        )
        assert summary["status"] == "finished", summary
        runs[share] = summary, stdout
    assert "shared by 2 ranks" in runs["true"][1] and "one all_gather per step" in runs["true"][1]
    assert "certified on every rank" in runs["false"][1]
    shared, unshared = (metric_rows(runs[k][0]) for k in ("true", "false"))
    assert len(shared) == len(unshared) > 20
    assert any("optim/grad_norm/level0" in row for row in shared)
    assert shared == unshared
    states = [
        torch.load(
            Path(runs[k][0]["checkpoint"]) / "mp_rank_00_model_states.pt", weights_only=False
        )["module"]
        for k in ("true", "false")
    ]
    assert states[0].keys() == states[1].keys()
    assert any("spectral_vectors" in name for name in states[0])
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name
