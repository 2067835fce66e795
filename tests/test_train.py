"""The walking skeleton, through the real entry point: shards -> flow -> DeepSpeed -> tracking -> checkpoint."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import run_pipeline


def train(tmp_path, *overrides: str):
    summary = tmp_path / f"summary-{len(list(tmp_path.glob('summary-*')))}.json"
    args = [
        "--config",
        "configs/debug.yaml",
        f"run.root={tmp_path}/runs",
        f"data.cache={tmp_path}/data",
        "--summary-json",
        str(summary),
        *overrides,
    ]
    out = run_pipeline("train", *args, MASTER_PORT="29631")
    return json.loads(summary.read_text()), out.stdout


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


def check_run_folder(summary: dict, steps: int) -> list[dict]:
    from pathlib import Path

    run = Path(summary["run_dir"])
    assert (run / "samples.png").stat().st_size > 0
    assert summary["panel"] == str(run / "panel.png") and (run / "panel.png").stat().st_size > 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["resolution"] == 16 and "tracking" in resolved
    ckpt = Path(summary["checkpoint"])
    assert ckpt.name == f"step{steps:08d}" and (ckpt / "COMPLETE").is_file()
    assert (run / "checkpoints" / "latest").read_text() == ckpt.name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/bpd" in r] == list(range(1, steps + 1))
    assert all(0 < r["train/bpd"] < 9 for r in rows if "train/bpd" in r)
    assert 0 < summary["final_val_bpd"] < 9
    return rows


def test_single_process_run_then_resume_continues_the_same_mlflow_run(tmp_path):
    first, stdout = train(tmp_path)
    assert "final validation bits/dim" in stdout and "mlflow ui --backend-store-uri" in stdout
    check_run_folder(first, steps=6)
    battery = first["battery"]  # the exploding-inverse battery ran on the final model
    assert battery["battery/val/finite_frac"] == 1.0 and battery["battery/val/recon_error"] < 1e-9
    assert {f"battery/sample_T{t}/nonfinite_frac" for t in ("0.7", "1", "1.5", "2")} <= set(battery)
    assert "non-finite samples" in stdout
    assert metric_steps(first["tracking_uri"], first["mlflow_run_id"], "battery/val/bpd") == [6]
    assert first["tracking_uri"].startswith("sqlite:///") and first["tracking_uri"].endswith(
        "mlflow.db"
    )
    assert metric_steps(first["tracking_uri"], first["mlflow_run_id"], "train/bpd") == list(
        range(1, 7)
    )

    second, stdout = train(tmp_path, "train.steps=9")
    assert "resumed from" in stdout and "step00000006" in stdout
    check_run_folder(second, steps=9)
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    steps = metric_steps(second["tracking_uri"], second["mlflow_run_id"], "train/bpd")
    assert sorted(steps) == list(range(1, 10))  # no duplicated or missing steps across the restart
    kept = sorted(p.name for p in (tmp_path / "runs" / "debug" / "checkpoints").glob("step*"))
    assert kept == ["step00000000", "step00000003", "step00000006", "step00000009"]  # + step 0


@pytest.mark.slow
def test_two_cpu_ranks_under_the_deepspeed_launcher(two_rank_run):
    """launch/local.sh, 2 ranks: the session's 2-rank run (tests/conftest.py; ZeRO 1, 2
    micro-batches per step), shared with the ZeRO 1 test of tests/test_engine.py."""
    summary, stdout = two_rank_run["summary"], two_rank_run["stdout"]
    check_run_folder(summary, steps=6)
    # DeepSpeed's own knob went through to the engine: its timers print at every micro-step.
    assert stdout.count("time (ms) | fwd_microstep") == 6 * 2, stdout[-3000:]
    from mlflow.tracking import MlflowClient

    params = MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"]).data.params
    assert params["run.world_size"] == "2" and params["train.micro_batch"] == "8"
    assert params["train.deepspeed.wall_clock_breakdown"] == "True"
    # DeepSpeed's own checkpoint files are there, next to ours, one data position per rank.
    from pathlib import Path

    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "mp_rank_00_model_states.pt").is_file()
    assert {p.name for p in ckpt.glob("rank*.json")} == {"rank0.json", "rank1.json"}


def test_first_images_are_a_pass_s_first_and_leave_the_val_loader_where_it_was(tmp_path):
    """The sampler check's images are read at the start of a run and the battery's at its end:
    the same first images of a pass, even where train.val_batches left a pass part-read, and
    neither read may shorten the next validation (a val loader's iter() finishes its pass)."""
    import torch

    from pipeline.data import build_loader
    from pipeline.train.run import first_images
    from tests.data_helpers import data_cfg, write_set

    val = build_loader(data_cfg(), write_set(tmp_path / "set", 8, [8] * 2, [4] * 4), "val", 4, 0, 1)
    whole = torch.cat(list(val))
    assert torch.equal(first_images(val, 6), whole[:6])
    assert torch.equal(torch.cat(list(val)), whole)  # the next pass is whole
    cut = iter(val)
    next(cut), next(cut)  # a validation stopped after 2 of 4 batches
    assert torch.equal(first_images(val, 6), whole[:6])
    assert torch.equal(torch.cat(list(cut)), whole[8:])  # the cut pass is where it was
