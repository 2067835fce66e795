"""The exploding-inverse battery (pipeline/theory/battery.py) and `python -m pipeline probe`.

Property tests on tiny flows in float64: a healthy flow reconstructs every input family to rounding
error, has finite bpd and samples everywhere, and invertible-mode gradients equal stored ones; a flow
made to contract hard (unbounded actnorm scales e^θ with θ ≪ 0, Behrmann et al. 2021's mechanism:
the inverse expands by e^-θ per block) is caught on every count, while the bounded preset given the
same parameters stays healthy. Then the command end to end on a checkpoint trained by debug.yaml.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.__main__ import main
from pipeline.flows import ActNorm, ModelConfig, build_flow
from pipeline.io import json_safe
from pipeline.theory.battery import FAMILIES, exploding_inverse_battery

IMAGE = (3, 8, 8)
N_BITS = 5
TINY = dict(levels=2, steps=2, width=8)
GLOW = dict(coupling="affine_exp", conv="lu", actnorm="unbounded")
MODELS = {
    "bounded": ModelConfig(**TINY),
    "glow": ModelConfig(**TINY, **GLOW),
    "additive": ModelConfig(**TINY, coupling="additive"),
}
SIZES = dict(n_images=8, n_samples=8, n_grad=4)
FAMILY_KEYS = ("recon_error", "recon_finite_frac", "finite_frac", "bpd", "bpd_max")
# measured on these flows: recon ≤ 4e-15 relative; invertible vs store gradients ≤ 6e-7 (float32)
RECON_TOL = 1e-12
GRAD_TOL = 1e-4


def data(n: int = 8, seed: int = 1) -> torch.Tensor:
    """n-bit dequantised images in [-1/2, 1/2] (docs/design.md §3)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 2**N_BITS, (n, *IMAGE), generator=g)
    return k / 2**N_BITS - 0.5 + torch.rand(n, *IMAGE, generator=g) / 2**N_BITS


def make_flow(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    flow = build_flow(cfg, IMAGE, N_BITS)
    flow.data_init(data(16, seed=9))
    return flow


def contract(flow, theta: float, bias: float = 0.0):
    """Every actnorm set to scale e^θ' (θ' = θ unbounded, α·tanh(θ/α) bounded) and bias `bias`."""
    with torch.no_grad():
        for _, _, block in flow.blocks():
            if isinstance(block, ActNorm):
                block.theta.fill_(theta)
                block.bias.fill_(bias)
    return flow


def expected_names(temperatures=(0.7, 1.0, 1.5, 2.0)) -> set[str]:
    names = {f"battery/{f}/{k}" for f in FAMILIES for k in FAMILY_KEYS}
    for t in temperatures:
        names |= {f"battery/sample_T{t:g}/nonfinite_frac", f"battery/sample_T{t:g}/max_abs"}
    return names | {"battery/invertible_grad_rel_error"}


@pytest.mark.parametrize("name", MODELS)
def test_a_healthy_flow_passes_every_probe(name):
    metrics = exploding_inverse_battery(make_flow(MODELS[name]), data(), **SIZES)
    assert set(metrics) == expected_names()
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values()), metrics
    for family in FAMILIES:
        assert metrics[f"battery/{family}/recon_error"] < RECON_TOL, family
        assert metrics[f"battery/{family}/recon_finite_frac"] == 1.0, family
        assert metrics[f"battery/{family}/finite_frac"] == 1.0, family
        assert metrics[f"battery/{family}/bpd"] <= metrics[f"battery/{family}/bpd_max"]
    for t in (0.7, 1, 1.5, 2):
        assert metrics[f"battery/sample_T{t}/nonfinite_frac"] == 0.0
    # the prior's spread grows with T, and so do the samples
    assert metrics["battery/sample_T0.7/max_abs"] < metrics["battery/sample_T2/max_abs"]
    # off-range noise is less likely than the data it was not trained on either
    assert metrics["battery/noise_10x/bpd"] > metrics["battery/noise_1x/bpd"]
    assert metrics["battery/invertible_grad_rel_error"] < GRAD_TOL


def test_the_caller_model_is_untouched_and_the_battery_is_deterministic():
    flow = make_flow(MODELS["glow"])
    flow.train()
    before = {k: v.clone() for k, v in flow.state_dict().items()}

    class Engine(torch.nn.Module):  # what DeepSpeed hands the loop: the flow is .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    first = exploding_inverse_battery(flow, data(), **SIZES)
    second = exploding_inverse_battery(Engine(flow), data(), **SIZES)
    assert first == second
    after = flow.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flow.training and flow.memory == "store"
    assert all(p.dtype == torch.float32 and p.grad is None for p in flow.parameters())
    other = exploding_inverse_battery(flow, data(), **SIZES, seed=1)
    assert other["battery/noise_3x/bpd"] != first["battery/noise_3x/bpd"]
    assert other["battery/val/bpd"] == first["battery/val/bpd"]  # the caller's images


def test_an_overflowing_inverse_is_caught_and_still_reported_as_json():
    # forward: x·e^-200 per actnorm, so f(x) underflows; inverse: e^800 overflows float64
    metrics = exploding_inverse_battery(
        contract(make_flow(MODELS["glow"]), -200.0), data(), **SIZES
    )
    for t in (0.7, 1, 1.5, 2):
        assert metrics[f"battery/sample_T{t}/nonfinite_frac"] == 1.0
        assert math.isnan(metrics[f"battery/sample_T{t}/max_abs"])  # no finite pixel at all
    for family in FAMILIES:  # x is lost: underflowed to 0 (recon ≈ 0) or overflowed back
        lost = metrics[f"battery/{family}/recon_error"] > 0.1
        assert lost or metrics[f"battery/{family}/recon_finite_frac"] < 1.0, family
    text = json.dumps(json_safe(metrics), allow_nan=False)  # strict JSON survives
    assert json.loads(text)["battery/sample_T2/max_abs"] == "nan"
    # the bounded preset given the same parameters: |log-scale| < α keeps both directions tame
    bounded = exploding_inverse_battery(
        contract(make_flow(MODELS["bounded"]), -200.0), data(), **SIZES
    )
    assert all(math.isfinite(v) for v in bounded.values()), bounded
    assert bounded["battery/sample_T2/nonfinite_frac"] == 0.0
    assert bounded["battery/noise_10x/recon_error"] < RECON_TOL


def test_an_ill_conditioned_inverse_shows_in_reconstruction_samples_and_gradients():
    # scale e^-14 under a bias of 1: the forward pass on the data stays finite, but x survives
    # only in the low digits of y, so every inverse amplifies rounding error by e^14 per block
    glow = exploding_inverse_battery(
        contract(make_flow(MODELS["glow"]), -14.0, bias=1.0), data(), **SIZES
    )
    assert glow["battery/val/finite_frac"] == 1.0
    assert glow["battery/val/recon_error"] > 1.0  # measured 4e9, in float64
    assert glow["battery/sample_T1/max_abs"] > 1e10  # measured 7e24
    assert glow["battery/invertible_grad_rel_error"] > 1e-3  # measured 9e-3
    bounded = exploding_inverse_battery(
        contract(make_flow(MODELS["bounded"]), -14.0, bias=1.0), data(), **SIZES
    )
    assert bounded["battery/val/recon_error"] < 1e-9  # measured 9e-12: e^α per block is allowed
    assert bounded["battery/sample_T1/max_abs"] < 1e6  # measured 1.2e4: bounded, if off-range
    assert bounded["battery/invertible_grad_rel_error"] < GRAD_TOL


def test_probe_command_on_a_trained_checkpoint(tiny_run, tmp_path, capsys):
    run_dir = tiny_run["run_dir"]
    sizes = ["--images", "4", "--samples", "4", "--grad-images", "2"]
    assert main(["probe", "--checkpoint", str(run_dir), "--json", *sizes]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result.pop("checkpoint").endswith("step00000006")  # the latest complete one
    assert set(result) == expected_names()
    assert result["battery/val/finite_frac"] == 1.0
    assert result["battery/val/recon_error"] < 1e-10
    assert result["battery/invertible_grad_rel_error"] < GRAD_TOL

    step = run_dir / "checkpoints" / "step00000003"
    args = ["probe", "--checkpoint", str(step), *sizes, "--temperatures", "1,3", "--no-gradients"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert str(step) in table and "sample_T3" in table and "noise_10x" in table
    assert "invertible_grad" not in table

    for bad in (tmp_path / "missing", tiny_run["root"] / "data"):
        assert main(["probe", "--checkpoint", str(bad)]) == 2
        *stages, err = capsys.readouterr().err.strip().splitlines()  # progress, then the error
        assert err.startswith("error:") and all(line.endswith(" ...") for line in stages), err


def test_the_sampler_check_is_deterministic_and_leaves_model_and_rng_as_they_were():
    """The guard's check (theory/battery.sampler_check) runs on the live model of a training run:
    it must not move its mode, its parameters, its buffers or the global RNG (exact resume), and
    the same weights must give the same verdict."""
    from pipeline.flows.base import reuse_weights
    from pipeline.theory.battery import sampler_check

    flow = make_flow(MODELS["bounded"]).train()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    rng = torch.get_rng_state()
    first = sampler_check(flow, data(4))
    assert sampler_check(flow, data(4)) == first and torch.equal(torch.get_rng_state(), rng)
    with reuse_weights():  # as the loop runs it: the walks share one normalisation, same numbers
        assert sampler_check(flow, data(4)) == first
    assert flow.training
    assert all(torch.equal(v, before[k]) for k, v in flow.state_dict().items())
    assert first["check/recon_error"] < 1e-5 and first["check/bpd_finite_frac"] == 1.0
    assert first["check/sample_nonfinite_frac"] == 0.0
    with torch.no_grad():  # the damaged study run: one prior's log σ overflows
        flow.levels[0].split.prior.bias[flow.levels[0].split.c_z] = 1e3
    flow.levels[0].split.log_std_bound = 0.0  # the prior before issue 22
    assert sampler_check(flow, data(4))["check/sample_nonfinite_frac"] == 1.0


def test_battery_damage_names_every_non_finite_family_and_temperature():
    from pipeline.theory.battery import battery_damage

    healthy = exploding_inverse_battery(make_flow(MODELS["bounded"]), data(), **SIZES)
    assert battery_damage(healthy) is None
    damaged = {
        **healthy,
        "battery/sample_T2/nonfinite_frac": 0.5,
        "battery/noise_10x/finite_frac": 0.25,
        "battery/val/recon_finite_frac": 0.0,
    }
    assert battery_damage(damaged) == (
        "non-finite samples at T=2 (50%); non-finite bpd on noise_10x (75%); "
        "non-finite reconstructions of val (100%)"
    )
