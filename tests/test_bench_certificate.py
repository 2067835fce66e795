"""`python -m pipeline bench certificate`: the normalisers' certificate per weight update prints
its JSON. A measurement, never a timed assertion: the test checks the shape through the real
entry point, on the debug config's tiny model."""

from __future__ import annotations

import json

from pipeline.bench.certificate import STAGES
from tests.conftest import run_pipeline


def test_bench_certificate_prints_seconds_per_update_by_stage_and_group():
    out = json.loads(
        run_pipeline(
            "bench", "certificate", "--config", "configs/debug.yaml", "--rounds", "2"
        ).stdout
    )
    assert out["resolution"] == 16 and out["model"] == {"levels": 2, "steps": 2, "width": 16}
    seconds = out["seconds_per_update"]
    assert len(seconds["wall_all"]) == 2 and seconds["wall_median"] > 0
    groups = out["groups"]
    assert len(groups) == len(out["profiled_stage_cpu_s_by_group"]) == 6  # 2 levels x 3 convs
    assert {g["normaliser"] for g in groups} == {"fourier", "matrix"}
    for group in groups:
        assert group["convs"] == 2 and group["m"] > 0 and group["forward_s"] >= 0
        assert (group["normaliser"] == "fourier") == ("frequencies" in group)
    assert set(out["profiled_stage_cpu_s"]) == {*STAGES, "backward"}
    assert out["top_ops"] and all(op["self_cpu_s"] >= 0 for op in out["top_ops"])
