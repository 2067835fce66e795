"""Diagnostics on maps whose answers are known: Lipschitz estimates, inverse error, grad norms,
log-det balance (docs/design.md §3.4-3.5); and the certified bounds of the pipeline.flows models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.theory import (
    certified_logdet_range,
    flow_diagnostics,
    grad_norms,
    inverse_error,
    level_group,
    lipschitz_estimate,
    lipschitz_estimates,
    logdet_balance,
    spectral_norms,
)


def known_linear_map(d: int = 16, top: float = 10.0, bottom: float = 0.1, seed: int = 0):
    """A = U·diag(σ)·Vᵀ with σ log-spaced from ``top`` to ``bottom``; returns (f, f⁻¹)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    sigma = torch.logspace(math.log10(top), math.log10(bottom), d, dtype=torch.float64)
    A = (U * sigma) @ V.T
    return (lambda x: x @ A.T), (lambda y: torch.linalg.solve(A, y.T).T)


@pytest.mark.parametrize("method", ["forward", "reverse", "auto"])
def test_linear_map_with_known_singular_values(method):
    f, f_inv = known_linear_map()
    x = torch.randn(3, 16, dtype=torch.float64)
    est, inv_est = lipschitz_estimates(f, f_inv, x, iters=60, method=method)
    assert est == pytest.approx(10.0, rel=1e-6)
    assert inv_est == pytest.approx(10.0, rel=1e-6)  # 1 / σ_min = 1 / 0.1
    # power iteration approaches from below: a lower bound at every iteration count
    for iters in (1, 2, 5):
        assert lipschitz_estimate(f, x, iters, method=method) <= 10.0 * (1 + 1e-12)


def test_structured_inputs_and_outputs():
    """Multi-scale latents: a list of tensors in and out, samples independent."""

    def f(x):
        return [2.0 * x[:, :4], torch.cat([3.0 * x[:, 4:6], 0.5 * x[:, 6:]], 1)]

    def f_inv(zs):
        return torch.cat([zs[0] / 2.0, zs[1][:, :2] / 3.0, zs[1][:, 2:] / 0.5], 1)

    x = torch.randn(5, 9, dtype=torch.float64)
    assert lipschitz_estimates(f, f_inv, x, iters=40) == pytest.approx((3.0, 2.0), rel=1e-6)
    assert inverse_error(f, f_inv, x) < 1e-15


def test_elementwise_map_estimate_is_the_largest_slope_at_the_data_and_below_the_bound():
    """y = x + ½·tanh(x): slope 1 + ½·sech²(x) in (1, 1.5], so L = 1.5, L_inv = 1 (certified)."""

    def f(x):
        return x + 0.5 * torch.tanh(x)

    def f_inv(y):  # Newton's method; autograd through the iterations gives the inverse's Jacobian
        x = y / 1.5
        for _ in range(12):
            x = x - (f(x) - y) / (1 + 0.5 / torch.cosh(x) ** 2)
        return x

    x = torch.tensor([[0.3, 1.0, 2.0, -0.7], [-1.2, 1.0, 0.5, 3.0]], dtype=torch.float64)
    slope = 1 + 0.5 / torch.cosh(x) ** 2
    per_sample = spectral_norms(f, x, iters=80)
    assert torch.allclose(per_sample, slope.max(1).values, rtol=1e-6)
    est, inv_est = lipschitz_estimates(f, f_inv, x, iters=80)
    assert est == pytest.approx(float(slope.max()), rel=1e-6) and est <= 1.5
    assert inv_est == pytest.approx(float(1 / slope.min()), rel=1e-6) and inv_est <= 1.0
    assert inverse_error(f, f_inv, x) < 1e-12


class NoForwardAD(torch.autograd.Function):
    """y = 2x with a backward but no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_auto_falls_back_to_reverse_mode():
    x = torch.randn(2, 3, dtype=torch.float64)
    assert lipschitz_estimate(NoForwardAD.apply, x, 5, method="auto") == pytest.approx(2.0)
    with pytest.raises((NotImplementedError, RuntimeError)):
        lipschitz_estimate(NoForwardAD.apply, x, 5, method="forward")


def test_inverse_error_reports_the_worst_entry_and_non_finite():
    x = torch.ones(2, 3, 4, 4)

    def encode(t):
        return t * 2

    def bad(z):
        out = z / 2
        out[1, 2, 3, 0] += 0.25
        return out

    assert inverse_error(encode, bad, x) == pytest.approx(0.25)
    assert math.isnan(inverse_error(encode, lambda z: z * math.nan, x))
    assert inverse_error(encode, lambda z: z / 0.0 + 1, x) == math.inf


class TwoLevels(nn.Module):
    def __init__(self):
        super().__init__()
        self.levels = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 2)])
        self.prior = nn.Linear(2, 1)

    def forward(self, x):
        return self.prior(self.levels[1](torch.tanh(self.levels[0](x))))


def test_grad_norms_global_per_level_and_sharded():
    torch.manual_seed(0)
    model = TwoLevels()
    model(torch.randn(8, 4)).pow(2).sum().backward()
    norms = grad_norms(model.named_parameters())
    grads = {n: p.grad for n, p in model.named_parameters()}
    total = torch.nn.utils.get_total_norm(list(grads.values()))
    assert norms["global"] == pytest.approx(float(total), rel=1e-6)
    for lvl in (0, 1):
        part = [g for n, g in grads.items() if n.startswith(f"levels.{lvl}.")]
        assert norms[f"level{lvl}"] == pytest.approx(
            float(torch.cat([g.flatten() for g in part]).norm())
        )
    assert set(norms) == {"global", "level0", "level1"}  # the prior belongs to no level
    assert level_group("module.levels.12.steps.3.conv.weight") == "level12"

    # ZeRO-2: two ranks each own half of every gradient; the reducer sums their squared norms
    def fragment(rank):
        def grad_fn(_name, p):
            flat = p.grad.flatten()
            half = (flat.numel() + 1) // 2
            return flat[:half] if rank == 0 else flat[half:]

        return grad_fn

    other = grad_norms(model.named_parameters(), grad_fn=fragment(1))
    other_sq = torch.tensor([other["global"] ** 2, other["level0"] ** 2, other["level1"] ** 2])
    calls = []

    def all_reduce(sq):
        calls.append(sq.clone())
        return sq + other_sq.to(sq.dtype)

    sharded = grad_norms(model.named_parameters(), grad_fn=fragment(0), reducer=all_reduce)
    assert len(calls) == 1 and calls[0].dtype == torch.float64
    for key in norms:
        assert sharded[key] == pytest.approx(norms[key], rel=1e-6)


def test_grad_norms_are_fp32_for_bf16_grads_and_propagate_non_finite():
    p = nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    p.grad = torch.full((4096,), 3e-3, dtype=torch.bfloat16)
    exact = math.sqrt(4096) * float(p.grad[0].double())
    assert grad_norms([("w", p)])["global"] == pytest.approx(exact, rel=1e-6)
    p.grad[7] = math.inf
    assert grad_norms([("w", p)])["global"] == math.inf


def test_logdet_balance_and_certified_range():
    levels = torch.tensor([[30.0, 34.0], [-8.0, -12.0], [0.0, 2.0]])  # [L=3, B=2], D = 10
    b = logdet_balance(levels, num_dims=10)
    assert b["level0"] == pytest.approx(3.2) and b["level1"] == pytest.approx(-1.0)
    assert b["level2"] == pytest.approx(0.1)
    assert b["expansion"] == pytest.approx(3.3) and b["contraction"] == pytest.approx(-1.0)
    assert b["total"] == pytest.approx(2.3)
    assert b["concentration"] == pytest.approx(3.2 / 4.3)
    blocks = logdet_balance({"coupling": torch.tensor([5.0]), "conv": -5.0}, num_dims=5)
    assert blocks == pytest.approx(
        {
            "coupling": 1.0,
            "conv": -1.0,
            "expansion": 1.0,
            "contraction": -1.0,
            "total": 0.0,
            "concentration": 0.5,
        }
    )
    assert certified_logdet_range(math.e, math.e**2) == pytest.approx((-2.0, 1.0))
    assert certified_logdet_range(math.inf, 2.0)[1] == math.inf


def real_flows():
    """pipeline.flows models (float64, data-initialised on x, then perturbed off the identity)."""
    flows = pytest.importorskip("pipeline.flows")
    if not hasattr(flows, "build_flow"):
        pytest.skip("pipeline.flows.build_flow is not there yet")
    variants = [
        flows.ModelConfig(levels=2, steps=2, width=8),
        flows.ModelConfig(levels=2, steps=2, width=8, coupling="additive", spectral_norm=True),
        flows.ModelConfig(levels=1, steps=2, coupling="none", split_prior="standard"),
    ]
    return [flows.build_flow(cfg, (3, 8, 8), 5).double() for cfg in variants]


def test_certified_bounds_hold_against_estimates_on_the_real_flows():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64) - 0.5
    for flow in real_flows():
        flow.data_init(x)
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        d = flow_diagnostics(flow, x, power_iters=20)
        # the linear flow's bound is exact (each actnorm → 1×1 conv pair certified as one matrix),
        # so the power-iteration estimate meets it up to rounding
        assert d["lipschitz/forward_bound"] * (1 + 1e-12) >= d["lipschitz/forward_est"] > 0
        assert d["lipschitz/inverse_bound"] * (1 + 1e-12) >= d["lipschitz/inverse_est"] > 0
        # the range can be attained (actnorm data-initialised onto its scale bound): allow rounding
        assert d["diagnostics/logdet_lower"] - 1e-12 <= d["diagnostics/logdet_min_per_dim"]
        assert d["diagnostics/logdet_max_per_dim"] <= d["diagnostics/logdet_upper"] + 1e-12
        assert d["stability/inverse_error"] < 1e-6
        levels = [k for k in d if k.startswith("balance/level") and k.count("/") == 2]
        blocks = [k for k in d if k.count("/") == 4]  # balance/level0/step1/conv/logdet
        assert sum(d[k] for k in levels) == pytest.approx(sum(d[k] for k in blocks))
        assert d["balance/total"] == pytest.approx(d["balance/blocks/total"])
        assert d["balance/blocks/expansion"] >= d["balance/expansion"]  # less cancellation
