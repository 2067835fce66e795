"""`python -m pipeline bench peer`: lipflow against normflows (a dev dependency) prints its JSON.

A measurement, never a timed assertion: the test checks the shape and that every ratio is a
positive number, through the real entry point, on the tiny --quick setting.
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from pipeline.bench import peer
from tests.conftest import PYTHON, ROOT, env_for_subprocess, run_pipeline

DT = torch.float64


def test_bench_peer_quick_prints_every_arm_with_ratios_to_normflows(tmp_path):
    pytest.importorskip("normflows", reason="a dev dependency: make setup installs it")
    saved = tmp_path / "peer.json"
    out = json.loads(
        run_pipeline("bench", "peer", "--quick", "--batch", "3", "--out", str(saved)).stdout
    )
    assert json.loads(saved.read_text()) == out  # --out: the same results, kept as they come
    assert out["normflows"] == "1.7.3"
    (result,) = out["results"]
    assert result["setting"]["name"] == "quick" and result["setting"]["batch"] == 3  # --batch
    arms = result["arms"]
    assert list(arms) == peer.DEFAULT_ARMS.split(",")
    for name, arm in arms.items():
        for key in ("ratio_to_normflows", "ratio_to_normflows_cpu", "images_per_s"):
            assert isinstance(arm[key], float) and math.isfinite(arm[key]) and arm[key] > 0, name
        assert 0 < arm["round_median_min_s"] <= arm["round_median_max_s"], name
        assert arm["params"] > 0 and arm["timed_steps"] == 2
    assert arms["normflows"]["ratio_to_normflows"] == 1.0
    assert "model_keys" not in arms["normflows"]
    # the default arm reports the ModelConfig defaults it ran with; presets override them
    assert arms["default"]["model_keys"]["coupling"] == peer.ModelConfig().coupling
    assert arms["glow"]["model_keys"]["coupling"] == "affine_exp"
    assert arms["default:invertible"]["model_keys"]["memory"] == "invertible"
    # matched architectures: the same blocks and subnets, priors differ (within 5%)
    assert abs(arms["glow"]["params"] / arms["normflows"]["params"] - 1) < 0.05
    assert all(v > 0 for v in result["goals"].values()) and len(result["goals"]) == 6


def test_bench_peer_says_clearly_when_normflows_is_missing():
    """Without normflows the command fails with one 'error:' line naming it and the fix."""
    code = (
        "import sys; sys.modules['normflows'] = None\n"  # import normflows now raises ImportError
        "from pipeline.__main__ import main\n"
        "sys.exit(main(['bench', 'peer', '--quick']))\n"
    )
    out = subprocess.run(
        [PYTHON, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env_for_subprocess(),
    )
    assert out.returncode != 0 and out.stdout == ""
    assert "error: bench peer needs normflows" in out.stderr and "make setup" in out.stderr


def test_arm_names_take_a_memory_mode_and_a_compile_suffix():
    assert peer.parse_arm("glow") == ("glow", "store", False)
    assert peer.parse_arm("default:invertible+compile") == ("default", "invertible", True)
    assert peer.arm_names("normflows,glow+compile") == ["normflows", "glow+compile"]
    with pytest.raises(peer.PipelineError, match="unknown arm 'glow:fast'"):
        peer.arm_names("glow:fast")


def test_bench_peer_split_prints_the_normalisations_parts():
    """The normalisers' own stages (their profiler ranges), one group
    per level and conv position, the certificate's rungs counted while training, and both
    routes' excess over the exact top."""
    out = json.loads(
        run_pipeline("bench", "peer", "--split", "--quick", "--probe-steps", "2").stdout
    )
    (split,) = out["split"]
    assert split["convs"] == 12 and split["groups"] == 6  # 2 levels x 3 conv positions
    parts = split["cpu_ms"]
    assert set(parts) >= {"grams", "power", "certify", "scales", "backward"}
    assert all(math.isfinite(v) and v >= 0 for v in parts.values())
    # one rung per conv and normalisation: the untrained round, then 2 training steps
    assert sum(v for k, v in split["rungs_untrained"].items() if k.startswith("rung_")) == 12
    probe = split["probe"]["rungs"]
    assert sum(v for k, v in probe.items() if k.startswith("rung_")) == 2 * 12
    excess = split["excess_over_exact_top"]
    assert 0 <= float(excess["cholesky"]) < 2e-2 and float(excess["gram_iteration"]) >= 0


@pytest.mark.parametrize("dtype", [DT, torch.complex128])
@pytest.mark.parametrize("shape", [(3, 4, 7), (3, 7, 4), (2, 5, 5), (1, 9, 2)])
def test_gram_iteration_bounds(dtype, shape):
    """‖G_t‖_F^(1/2^t) ≥ σ_max(A) ≥ it / min(m, n)^(1/2^(t+1)) for t = 0..6, batched real and
    complex, wide and tall; and no overflow on huge entries (the per-step rescaling)."""
    a = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(sum(shape)))
    sigma = torch.linalg.matrix_norm(a, ord=2)
    rank = min(shape[-2:])
    for t in range(7):
        bound = peer.gram_iteration_norm(a, t)
        assert bound.shape == shape[:-2] and bound.dtype == DT
        assert (bound >= sigma * (1 - 1e-12)).all(), t
        assert (bound <= sigma * rank ** (1 / 2 ** (t + 1)) * (1 + 1e-12)).all(), t
    huge = peer.gram_iteration_norm(a * 1e150, 6)
    assert torch.isfinite(huge).all()
    torch.testing.assert_close(huge, peer.gram_iteration_norm(a, 6) * 1e150, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [DT, torch.complex128])
def test_gram_iteration_differentiable(dtype):
    """gram_iteration_norm is differentiable: finite gradients that match finite differences."""
    a = torch.randn(2, 3, 4, dtype=dtype, generator=torch.Generator().manual_seed(7))
    a.requires_grad_(True)
    (grad,) = torch.autograd.grad(peer.gram_iteration_norm(a, 3).sum(), a)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda x: peer.gram_iteration_norm(x, 3), (a,))
