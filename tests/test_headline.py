"""The headline check (docs/design.md §3.2), through the real training loop: a linear flow trained by
`python -m pipeline train` reaches the closed-form pooled optimum, and a nonlinear flow beats it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.study.optimum import LINEAR
from pipeline.theory.gaussian import gaussian_images, gaussian_optimum, random_covariance
from tests.conftest import PYTHON, env_for_subprocess, run_main, run_together

R, N_BITS = 16, 5
TRAIN = [
    "train.steps=300",
    "train.micro_batch=64",
    "train.lr=1e-2",
    "train.warmup_steps=10",
    "train.save_every=1000",
    "guard.diagnostics_every=0",
    "data.hflip=false",
    "train.optimum_images=100000",
]


def train(tmp_path, runs: dict[str, tuple[str, ...]]) -> None:
    """`python -m pipeline train` of each run (name: overrides) under <tmp_path>/runs, all at once:
    each is one process of one thread, so two take about as long as one on the two cores."""
    commands = {}
    for port, (name, overrides) in enumerate(runs.items(), 29660):
        argv = [PYTHON, "-m", "pipeline", "train", "--config", "configs/debug.yaml",
                f"run.root={tmp_path}/runs", f"run.name={name}", f"data.cache={tmp_path}/data",
                f"data.resolution={R}", f"data.n_bits={N_BITS}", *TRAIN, *overrides]  # fmt: skip
        commands[name] = argv, env_for_subprocess(MASTER_PORT=str(port))
    for name, out in run_together(commands, timeout=900).items():
        assert out.returncode == 0, f"{name}:\n" + out.stdout[-3000:] + out.stderr[-3000:]


def measure(tmp_path, capsys, name: str) -> tuple[float, float]:
    """(the trained flow's bpd over the whole train split, the loop's theory/optimum_bpd)."""
    run = tmp_path / "runs" / name
    evaluate = ["evaluate", "--checkpoint", str(run), "--split", "train", "--json"]
    result = json.loads(run_main(capsys, *evaluate, "--batch-size", "64").strip().splitlines()[-1])
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    optimum = next(r["theory/optimum_bpd"] for r in rows if "theory/optimum_bpd" in r)
    return result["bpd"], optimum


@pytest.mark.slow
def test_linear_flow_reaches_the_closed_form_optimum_on_gaussian_images(tmp_path, capsys):
    cov = random_covariance(12, n_bits=N_BITS, seed=3)
    levels = gaussian_images(1024, cov, resolution=R, n_bits=N_BITS, seed=4, dequantize=False)
    src = tmp_path / "gauss"
    src.mkdir()
    for i, k in enumerate(levels.numpy()):
        Image.fromarray((k << (8 - N_BITS)).transpose(1, 2, 0)).save(src / f"{i:05d}.png")
    run_main(
        capsys,
        "shards",
        "--src",
        str(src),
        "--out",
        str(tmp_path / "shards"),
        "--resolution",
        str(R),
        "--shard-size",
        "64",
        "--workers",
        "1",
        "--quiet",
    )

    shards = ("data.source=shards", f"data.shards={tmp_path}/shards/{R}")
    train(tmp_path, {"gauss": (*LINEAR, *shards)})
    achieved, optimum = measure(tmp_path, capsys, "gauss")
    analytic = gaussian_optimum(cov, resolution=R, n_bits=N_BITS).bpd
    print(
        f"gaussian {R}x{R}: analytic {analytic:.4f}, data optimum {optimum:.4f}, "
        f"linear flow {achieved:.4f} (gap {achieved - optimum:+.5f})"
    )
    assert abs(optimum - analytic) < 0.01  # the data's optimum is the covariance's, up to sampling
    # Within 0.01 bpd, and never below it by more than the noise of one dequantisation draw.
    assert -2e-3 < achieved - optimum < 0.01, (achieved, optimum)


@pytest.mark.slow
def test_linear_flow_reaches_it_on_faces_and_a_nonlinear_flow_beats_it(tmp_path, capsys):
    faces = ("data.synthetic_train=1024", "data.synthetic_val=128")
    # beside the linear flow's 300 steps, the nonlinear one's first 100 (measured: 0.8 bpd below the
    # optimum by then, 1.1 after 300) keep the pair as long as the linear run alone
    train(tmp_path, {"linear": (*faces, *LINEAR), "glow": (*faces, "train.steps=100")})
    linear, optimum = measure(tmp_path, capsys, "linear")
    assert -2e-3 < linear - optimum < 0.01, (linear, optimum)
    nonlinear, same_optimum = measure(tmp_path, capsys, "glow")
    assert same_optimum == optimum
    print(
        f"faces {R}x{R}: optimum {optimum:.4f}, linear {linear:.4f}, nonlinear {nonlinear:.4f} "
        f"({optimum - nonlinear:.4f} bpd below the linear optimum)"
    )
    assert nonlinear < optimum - 0.05
    assert np.isfinite(nonlinear)
