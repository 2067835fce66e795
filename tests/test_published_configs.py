"""Every command answers on the published configs (celebahq-256, celebahq-1024) within 60 s on the
2-core CPU, and a Ctrl-C during its work ends it with one line and exit code 130.

The commands that read a checkpoint get one of each config: its resolved config (pointing at a
small shard set of the config's resolution), verified files, and a stand-in for the weights
(the real ones are 1-2 GB and take minutes to load and use on a CPU). Each test stops its command
once it has said what it loads and started building the model, before the weights are read."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config, save_config
from pipeline.train import checkpoint as ckpt
from tests.conftest import PYTHON, ROOT, env_for_subprocess, run_pipeline
from tests.data_helpers import write_set

pytestmark = pytest.mark.usefixtures("sigint_reaches_children")
CONFIGS = ["configs/celebahq-256.yaml", "configs/celebahq-1024.yaml"]
FIRST_OUTPUT_S = 60


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{config: a run folder holding one checkpoint of it (weights stood in, see above)}."""
    out = {}
    for config in CONFIGS:
        cfg = load_config(ROOT / config)
        root = tmp_path_factory.mktemp(cfg.run.name)
        # 4 val shards of 8: one per worker of the config, and a batch for evaluate and probe
        shards = write_set(root / "shards", cfg.data.resolution, [1] * 4, [8] * 4)
        cfg = load_config(ROOT / config, [f"data.shards={shards}"])
        folder = root / "run" / "checkpoints" / ckpt.tag_for(0)
        folder.mkdir(parents=True)
        save_config(cfg, folder / "config.yaml")
        torch.save({"module": {}}, folder / "mp_rank_00_model_states.pt")
        ckpt.write_manifest(folder)
        out[config] = root / "run"
    return out


def first_output_then_interrupt(args: list[str], wanted: str) -> tuple[list[str], int]:
    """Run `python -m pipeline ARGS`, read its stdout and stderr until a line holding `wanted`
    (failing after FIRST_OUTPUT_S), press Ctrl-C (SIGINT) and return all its lines and its exit
    code."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "pipeline", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env_for_subprocess(),
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(
        target=lambda: [*map(lines.put, proc.stdout), lines.put(None)], daemon=True
    ).start()
    seen, deadline = [], time.monotonic() + FIRST_OUTPUT_S
    try:
        while not seen or wanted not in seen[-1]:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0))
            assert line is not None, f"exited {proc.wait()} before {wanted!r}:\n{''.join(seen)}"
            seen.append(line)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"no {wanted!r} within {FIRST_OUTPUT_S} s:\n{''.join(seen)}")
    proc.send_signal(signal.SIGINT)
    while (line := lines.get(timeout=60)) is not None:
        seen.append(line)
    return [line.rstrip("\n") for line in seen], proc.wait(timeout=60)


def assert_interrupted_cleanly(lines: list[str], code: int, stage: str) -> None:
    assert code == 130, "\n".join(lines)
    assert lines[-1].startswith(f"error: interrupted during {stage}"), "\n".join(lines)
    assert lines[-1].endswith("; nothing was written")
    assert not any("Traceback" in line for line in lines), "\n".join(lines)


@pytest.mark.parametrize("config", CONFIGS)
def test_config_and_train_help_answer_at_once(config):
    for args in (["config", "--config", config], ["train", "--config", config, "--help"]):
        assert run_pipeline(*args, timeout=FIRST_OUTPUT_S).stdout.strip()


@pytest.mark.parametrize("config", CONFIGS)
def test_model_prints_certified_levels_as_it_goes(config):
    """The summary's head, then each level's certified bounds as they are computed; estimates
    are not computed by default at these sizes."""
    lines, code = first_output_then_interrupt(["model", "--config", config], " L_inv=")
    certified = next(i for i, line in enumerate(lines) if " L_inv=" in line)
    assert lines[certified].startswith("    level 0: "), "\n".join(lines)
    assert any(line.startswith("  parameters: ") for line in lines[:certified])
    assert not any(line.startswith(("data-initialising", "estimating")) for line in lines)
    assert_interrupted_cleanly(lines, code, "certifying the bounds level by level")


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("command", ["sample", "evaluate", "probe"])
def test_checkpoint_commands_say_what_they_load(checkpoints, config, command, tmp_path):
    run, grid = checkpoints[config], tmp_path / "samples.png"
    size = load_config(ROOT / config).data.resolution
    extra = {
        "sample": ["--n", "1", "--out", str(grid)],
        "evaluate": ["--json"],
        "probe": ["--json"],
    }
    args = [command, "--checkpoint", str(run), *extra[command]]
    lines, code = first_output_then_interrupt(args, "building the model of ")
    assert lines[0] == f"checking checkpoint {run} ..."
    building = next(line for line in lines if line.startswith("building the model of "))
    assert f"step00000000 (3x{size}x{size}, " in building
    assert_interrupted_cleanly(lines, code, "building the model of ")
    assert not grid.exists()
