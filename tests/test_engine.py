"""DeepSpeed engine variants on 2 CPU ranks, and what a checkpoint is good for without DeepSpeed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.distributed import deepspeed_config, free_port
from pipeline.flows import ModelConfig, build_flow
from pipeline.train.config import TrainConfig
from pipeline.train.inference import load_model
from tests.conftest import PYTHON, env_for_subprocess, launch_two_ranks, run_main


def test_deepspeed_json_is_derived_and_batch_arithmetic_checked():
    train = TrainConfig(micro_batch=8, grad_accum=4, grad_clip=0.5, zero_stage=2)
    ds = deepspeed_config(train, world=2)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"] == {"stage": 2}
    assert ds["gradient_clipping"] == 0.5
    train.global_batch = 48
    with pytest.raises(ValueError, match=r"global_batch = 48 .* 8 × train.grad_accum 4 × 2 rank"):
        deepspeed_config(train, world=2)


def assert_zero_run(s: dict, stdout: str, port: int) -> tuple[Path, dict, dict]:
    """A finished 2-rank ZeRO run; returns (its checkpoint, DeepSpeed's fp32 state dict of it, our
    loaded model's state dict)."""
    assert "ActNorm data-dependent init identical on 2 rank(s)" in stdout
    # DeepSpeed's CPU shared-memory all-reduce segments (~66 MB each) are not left behind in RAM
    leftover = f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_"
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(leftover)]
    assert s["status"] == "finished" and s["skipped_steps"] == 0 and 0 < s["final_val_bpd"] < 9
    rows = [json.loads(r) for r in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/bpd" in r]
    assert len(train_rows) == 6 and all(0 < r["optim/grad_norm"] < 1e3 for r in train_rows)
    ckpt = Path(s["checkpoint"])
    # ZeRO partitions the optimizer state: one file per rank, and DeepSpeed's own converter reads them.
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    model, _, _ = load_model(ckpt)
    ours = model.state_dict()
    for name, tensor in fp32.items():
        assert torch.equal(tensor.float(), ours[name].float()), name
    return ckpt, fp32, ours


@pytest.mark.slow
def test_zero_1_fp32_and_accumulation_on_two_ranks(two_rank_run):
    """ZeRO 1, fp32, 2 micro-batches per step: the session's 2-rank run (tests/conftest.py)."""
    run = two_rank_run
    assert_zero_run(run["summary"], run["stdout"], port=run["port"])


@pytest.mark.slow
def test_zero_2_and_bf16_on_two_ranks(tmp_path):
    port = 29652
    s, stdout = launch_two_ranks(
        tmp_path, port, "train.zero_stage=2", "train.precision=bf16", "guard.diagnostics_every=3"
    )
    ckpt, fp32, ours = assert_zero_run(s, stdout, port=port)
    # the commands too, once: each costs a DeepSpeed import
    assert_zero_to_fp32_commands_work(ckpt, set(fp32), ours, tmp_path)


def assert_zero_to_fp32_commands_work(
    ckpt: Path, names: set[str], ours: dict, tmp_path: Path
) -> None:
    """DeepSpeed's converter as a command, in this environment (it imports huggingface_hub):
    `python -m deepspeed.utils.zero_to_fp32` and the zero_to_fp32.py DeepSpeed drops beside the
    checkpoints, both on the folder of step folders with its `latest` pointer."""
    script = ckpt.parent / "zero_to_fp32.py"
    assert script.is_file(), sorted(p.name for p in ckpt.parent.iterdir())
    commands = {
        "module": [PYTHON, "-m", "deepspeed.utils.zero_to_fp32"],
        "script": [PYTHON, str(script)],
    }
    for how, command in commands.items():
        out_dir = tmp_path / f"fp32-{how}"
        out = subprocess.run(
            [*command, str(ckpt.parent), str(out_dir)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env=env_for_subprocess(),
        )
        assert out.returncode == 0, f"{how}: " + out.stdout[-2000:] + out.stderr[-2000:]
        converted = torch.load(out_dir / "pytorch_model.bin", weights_only=True)
        assert set(converted) == names, how  # what the Python API gives
        for name, tensor in converted.items():  # fp32 weights; buffers keep their dtype
            expected = ours[name].float() if ours[name].is_floating_point() else ours[name]
            assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), (how, name)


def test_export_sample_evaluate_from_a_checkpoint(tiny_run, tmp_path, capsys):
    run = tiny_run["run_dir"]
    model, cfg, folder = load_model(run)
    assert folder.name == "step00000006"  # the run folder's newest complete checkpoint

    run_main(capsys, "export", "--checkpoint", str(run), "--out", str(tmp_path / "model.pt"))
    blob = torch.load(tmp_path / "model.pt", weights_only=True)  # no code runs on load
    assert blob["step"] == 6
    exported = blob["config"]  # rebuilt as pipeline/commands/export.py says
    r = exported["data"]["resolution"]
    plain = build_flow(ModelConfig(**exported["model"]), (3, r, r), exported["data"]["n_bits"])
    plain.load_state_dict(blob["state_dict"])
    x = torch.rand(4, 3, r, r) - 0.5
    with torch.no_grad():
        assert torch.equal(plain.eval()(x)["log_prob"], model(x)["log_prob"])

    grid = tmp_path / "grid.png"
    earlier = run / "checkpoints" / "step00000003"  # a step folder, not the newest
    run_main(capsys, "sample", "--checkpoint", str(earlier), "--n", "9", "--temperature", "0.7",
             "--out", str(grid))  # fmt: skip
    from PIL import Image

    with Image.open(grid) as image:
        assert image.size == (3 * (r + 2) + 2, 3 * (r + 2) + 2)

    out = run_main(capsys, "evaluate", "--checkpoint", str(run), "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["split"] == "val" and result["images"] == 32 and 0 < result["bpd"] < 9
    summary_bpd = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert abs(result["bpd"] - summary_bpd["val/bpd"]) < 1e-4  # same split, same numbers


@pytest.mark.parametrize(
    "command, options",
    [
        ("evaluate", ["--max-batches", "1"]),
        ("probe", ["--images", "2", "--samples", "2", "--no-gradients"]),
    ],
)
def test_json_out_writes_the_object_json_prints(tiny_run, tmp_path, capsys, command, options):
    # what a study reads as the command's result: the file, not a line of stdout
    path = tmp_path / "result.json"
    args = [command, "--checkpoint", str(tiny_run["run_dir"]), *options]
    printed = run_main(capsys, *args, "--json", "--json-out", str(path))
    assert json.loads(path.read_text()) == json.loads(printed)
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_model(tmp_path)


def test_free_port_is_bindable_and_a_range_skips_taken_ports():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        assert free_port(range(busy, busy + 1_000)) != busy  # the next free one of the range
        with pytest.raises(RuntimeError, match="no free port"):
            free_port(range(busy, busy + 1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))  # any port the OS picks
