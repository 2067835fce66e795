"""docs/design.md §3.1-3.2 through training: a linear per-position flow trained with Adam reaches the pooled
closed-form optimum, and the diagnostics and divergence detector behave on a real training run.

The flow here is deliberately minimal and self-contained (squeeze, actnorm, one shared c×c matrix):
it is the linear class of §3.2 with a free bias, so its training NLL can be held to the closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.theory import (
    DivergenceDetector,
    GuardConfig,
    flow_diagnostics,
    gaussian_images,
    grad_norms,
    optimal_nll,
    random_covariance,
)
from pipeline.theory.closed_form import dequantization_variance, levels_to_midpoints
from pipeline.theory.detector import (
    GRAD_NORM,
    GRAD_NORM_SPIKE,
    INVERSE_ERROR,
    LOGDET_BOUND,
    LOSS,
    LOSS_SPIKE,
    NON_FINITE_GRAD,
    NON_FINITE_LOSS,
)

N_BITS = 5
SQUEEZE = 2
RES = 8


class LinearFlow(nn.Module):
    """z_n = W·(e^s ⊙ (x_n + b)) for every squeeze-s position vector x_n of an image.

    log|det J| = N·(Σ s + log|det W|); the pipeline.flows API: forward(x) -> dict, encode, decode,
    lipschitz_bound (certified: ‖W·diag(e^s)‖ ≤ ‖W‖·max e^s, and likewise for the inverse).
    """

    def __init__(self, shape: tuple[int, int, int], squeeze: int, n_bits: int):
        super().__init__()
        c, h, w = shape
        self.shape, self.s, self.n_bits = shape, squeeze, n_bits
        self.c = c * squeeze**2
        self.positions = h * w // squeeze**2
        self.log_scale = nn.Parameter(torch.zeros(self.c))
        self.bias = nn.Parameter(torch.zeros(self.c))
        self.weight = nn.Parameter(torch.eye(self.c))

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.s
        x = x.reshape(b, c, h // s, s, w // s, s).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, self.positions, self.c)

    def unsqueeze(self, v: torch.Tensor) -> torch.Tensor:
        c, h, w = self.shape
        s = self.s
        v = v.reshape(-1, h // s, w // s, c, s, s).permute(0, 3, 1, 4, 2, 5)
        return v.reshape(-1, c, h, w)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """ActNorm-style data init: zero mean, unit variance per channel."""
        v = self.squeeze(x).reshape(-1, self.c)
        self.bias.copy_(-v.mean(0))
        self.log_scale.copy_(-v.std(0).log())

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.squeeze(x)
        z = ((v + self.bias) * self.log_scale.exp()) @ self.weight.T
        logdet = self.positions * (self.log_scale.sum() + torch.linalg.slogdet(self.weight)[1])
        return z, logdet.expand(x.shape[0])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        v = torch.linalg.solve(self.weight, z.transpose(1, 2)).transpose(1, 2)
        return self.unsqueeze(v * (-self.log_scale).exp() - self.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z, logdet = self.encode(x)
        logpz = -0.5 * (z * z).sum((1, 2)) - 0.5 * z[0].numel() * math.log(2 * math.pi)
        log_prob = logpz + logdet
        dims = z[0].numel()
        return {
            "log_prob": log_prob,
            "logpz": logpz,
            "logdet": logdet,
            "logdet_levels": logdet[None],
            "bpd": -log_prob / (dims * math.log(2)) + self.n_bits,
        }

    @torch.no_grad()
    def lipschitz_bound(self) -> tuple[float, float]:
        sigma = torch.linalg.svdvals(self.weight.double())
        scale = self.log_scale.double()
        return float(sigma[0] * scale.max().exp()), float((-scale).max().exp() / sigma[-1])

    @torch.no_grad()
    def expected_bpd(self, k: torch.Tensor) -> float:
        """E_u[bpd] over the dequantisation noise, exactly: x = m + ε, E[ε] = 0, Cov ε = σ²I."""
        A = (self.weight * self.log_scale.exp()).double()
        a = A @ self.bias.double()
        m = self.squeeze(levels_to_midpoints(k, self.n_bits))
        sq = ((m @ A.T + a) ** 2).sum((1, 2)) + self.positions * dequantization_variance(
            self.n_bits
        ) * (A**2).sum()
        dims = self.positions * self.c
        nll = (
            0.5 * sq
            + 0.5 * dims * math.log(2 * math.pi)
            - self.positions * torch.linalg.slogdet(A)[1]
        )
        return float(nll.mean()) / (dims * math.log(2)) + self.n_bits


def dequantize(k: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The loader's layout: x = k/2^n - 1/2 + U(0, 2^-n), float32."""
    return (k.float() + torch.rand(k.shape, generator=g)) / 2**N_BITS - 0.5


def train(flow, k, steps, g, detector=None, lr=0.02, diagnose_every=50, faults=None):
    """Full-batch Adam with fresh dequantisation noise each step; feeds the detector if given."""
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    events = []
    for step in range(steps):
        x = dequantize(k, g)
        if faults and step in faults:
            x = faults[step](x)
        loss = flow(x)["bpd"].mean()
        opt.zero_grad()
        loss.backward()
        metrics = {LOSS: loss.detach(), GRAD_NORM: grad_norms(flow.named_parameters())["global"]}
        if diagnose_every and step % diagnose_every == 0:
            metrics.update(flow_diagnostics(flow, x[:4], power_iters=8))
        if detector is not None:
            events += detector.observe(step, metrics, rank=0)
        opt.step()
        sched.step()
    return events


def test_linear_flow_trained_with_adam_reaches_the_pooled_optimum():
    cov = random_covariance(12, n_bits=N_BITS, seed=1)
    k = gaussian_images(128, cov, resolution=RES, n_bits=N_BITS, seed=2, dequantize=False)
    # one W and one bias shared by all images: the pooled, centred optimum of these very images
    optimum = optimal_nll(k, n_bits=N_BITS, squeeze=SQUEEZE, mode="pooled", centered=True)
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    flow = LinearFlow((3, RES, RES), SQUEEZE, N_BITS)
    flow.initialize(dequantize(k, g))
    start = flow.expected_bpd(k)
    detector = DivergenceDetector(GuardConfig())
    events = train(flow, k, 200, g, detector)
    assert events == []  # a clean run produces no events

    # exact expected objective (no sampling): never below the optimum, and within 0.01 bpd of it
    expected = flow.expected_bpd(k)
    assert expected >= optimum.bpd - 1e-6
    assert expected - optimum.bpd < 0.01 < start - optimum.bpd
    # what training measures: bpd on fresh dequantisation noise, mean ± standard error
    with torch.no_grad():
        draws = torch.tensor([float(flow(dequantize(k, g))["bpd"].mean()) for _ in range(40)])
    mean, stderr = float(draws.mean()), float(draws.std()) / math.sqrt(len(draws))
    gap = mean - optimum.bpd
    print(f"optimum {optimum.bpd:.5f} bpd, trained {mean:.5f} ± {stderr:.5f}, gap {gap:+.5f}")
    assert gap < 0.01
    assert gap > -4 * stderr - 1e-4  # not below the optimum beyond sampling noise


def test_flow_diagnostics_measure_the_flow():
    torch.manual_seed(0)
    flow = LinearFlow((3, RES, RES), SQUEEZE, N_BITS)
    with torch.no_grad():
        flow.weight.copy_(torch.randn(12, 12) / 3 + torch.eye(12))
        flow.log_scale.copy_(torch.linspace(-0.5, 1.0, 12))
    x = torch.rand(3, 3, RES, RES) - 0.5
    d = flow_diagnostics(flow, x, power_iters=60)
    J = (flow.weight * flow.log_scale.exp()).detach().double()  # the Jacobian per position
    sigma = torch.linalg.svdvals(J)
    assert d["lipschitz/forward_est"] == pytest.approx(float(sigma[0]), rel=1e-4)
    assert d["lipschitz/inverse_est"] == pytest.approx(float(1 / sigma[-1]), rel=1e-4)
    assert d["lipschitz/forward_bound"] >= d["lipschitz/forward_est"]
    assert d["lipschitz/inverse_bound"] >= d["lipschitz/inverse_est"]
    per_dim = float(torch.linalg.slogdet(J)[1]) / 12
    assert d["balance/level0/logdet"] == pytest.approx(per_dim, rel=1e-5)
    assert d["diagnostics/logdet_max_per_dim"] == pytest.approx(per_dim, rel=1e-5)
    assert d["balance/expansion"] == pytest.approx(max(per_dim, 0.0), abs=1e-7)
    assert d["stability/inverse_error"] < 1e-5
    assert flow.training  # the mode is restored


def test_detector_sees_faults_injected_into_training():
    cov = random_covariance(12, n_bits=N_BITS, seed=4)
    k = gaussian_images(64, cov, resolution=RES, n_bits=N_BITS, seed=5, dequantize=False)
    g = torch.Generator().manual_seed(6)
    flow = LinearFlow((3, RES, RES), SQUEEZE, N_BITS)
    flow.initialize(dequantize(k, g))
    detector = DivergenceDetector(GuardConfig(min_history=20))

    def outliers(x):  # a corrupt batch: saturated checkerboards
        sign = (torch.arange(RES)[:, None] + torch.arange(RES)[None, :]) % 2 * 2 - 1
        return (0.49 * sign).expand_as(x).clone()

    events = train(flow, k, 60, g, detector, diagnose_every=0, faults={45: outliers})
    kinds = {(e.step, e.kind) for e in events}
    assert (45, LOSS_SPIKE) in kinds and (45, GRAD_NORM_SPIKE) in kinds
    assert all(e.step == 45 for e in events)

    with torch.no_grad():  # a NaN parameter: non-finite loss and gradient
        flow.bias[3] = math.nan
    events = train(flow, k, 1, g, detector, diagnose_every=0)
    assert {e.kind for e in events} == {NON_FINITE_LOSS, NON_FINITE_GRAD}


def step_and_probe_metrics(flow, x) -> dict:
    """What the training loop hands the detector: the batch's log-det extremes (every step) and
    the flow diagnostics probe."""
    with torch.no_grad():
        per_dim = flow(x)["logdet"].double() / x[0].numel()
    return {
        **flow_diagnostics(flow, x),
        "stability/logdet_max_per_dim": float(per_dim.max()),
        "stability/logdet_min_per_dim": float(per_dim.min()),
    }


def test_detector_sees_a_wrong_certificate_and_a_broken_inverse():
    torch.manual_seed(0)
    x = torch.rand(4, 3, RES, RES) - 0.5

    class Overclaiming(LinearFlow):
        def lipschitz_bound(self):
            return 1.0, 1.0  # claims an isometry

    flow = Overclaiming((3, RES, RES), SQUEEZE, N_BITS)
    with torch.no_grad():
        flow.log_scale.fill_(1.0)  # expands every direction by e
    detector = DivergenceDetector()
    events = detector.observe(7, step_and_probe_metrics(flow, x), rank=3)
    assert [(e.step, e.kind, e.rank) for e in events] == [(7, LOGDET_BOUND, 3)]
    assert events[0].value == pytest.approx(1.0, rel=1e-5) and events[0].threshold < 1e-3

    honest = LinearFlow((3, RES, RES), SQUEEZE, N_BITS)
    with torch.no_grad():  # condition number 1e7: the float32 inverse loses the input
        u, _ = torch.linalg.qr(torch.randn(12, 12))
        honest.weight.copy_((u * torch.logspace(0, -7, 12)) @ u.T)
    metrics = flow_diagnostics(honest, x)
    assert metrics["lipschitz/inverse_bound"] > 1e6  # certified: it warned of this
    events = detector.observe(8, metrics, rank=0)
    assert [e.kind for e in events] == [INVERSE_ERROR]


def real_linear_flow(levels: int, res: int):
    """pipeline.flows' linear preset (docs/design.md §3.2): coupling=none, standard split prior."""
    flows = pytest.importorskip("pipeline.flows")
    if not hasattr(flows, "build_flow"):
        pytest.skip("pipeline.flows.build_flow is not there yet")
    cfg = flows.ModelConfig(levels=levels, steps=2, coupling="none", split_prior="standard")
    return flows.build_flow(cfg, (3, res, res), N_BITS)


def fit(flow, k, steps, g, lr=0.01):
    """Plain Adam on fresh dequantisation noise; returns (mean, stderr) of bpd over 40 draws."""
    flow.data_init(dequantize(k, g))
    train(flow, k, steps, g, lr=lr, diagnose_every=0)
    with torch.no_grad():
        draws = torch.tensor([float(flow(dequantize(k, g))["bpd"].mean()) for _ in range(40)])
    return float(draws.mean()), float(draws.std()) / math.sqrt(len(draws))


def test_real_linear_flow_reaches_the_pooled_optimum():
    cov = random_covariance(12, n_bits=N_BITS, seed=1)
    k = gaussian_images(128, cov, resolution=RES, n_bits=N_BITS, seed=2, dequantize=False)
    optimum = optimal_nll(k, n_bits=N_BITS, squeeze=SQUEEZE)
    torch.manual_seed(0)
    mean, stderr = fit(real_linear_flow(1, RES), k, 200, torch.Generator().manual_seed(3))
    gap = mean - optimum.bpd
    print(f"pipeline.flows linear: optimum {optimum.bpd:.5f}, trained {mean:.5f}, gap {gap:+.5f}")
    assert -4 * stderr - 1e-4 < gap < 0.01


def test_two_level_linear_flow_lies_between_the_squeeze_2_and_4_optima():
    """With standard split priors an L-level linear flow mixes within 2^L-blocks only and contains
    the 1-level class, so optimum(s=2^L) ≤ its NLL ≤ optimum(s=2); spatially correlated data
    separates the two."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.interpolate(torch.randn(128, 1, 2, 2, generator=g), size=(RES, RES))
    x = 0.1 * base * torch.tensor([1.0, 0.7, 0.4]).view(1, 3, 1, 1)
    x = x + 0.03 * torch.randn(128, 3, RES, RES, generator=g)
    k = ((x + 0.5) * 2**N_BITS).floor().clamp(0, 2**N_BITS - 1).to(torch.uint8)
    s2 = optimal_nll(k, n_bits=N_BITS, squeeze=2).bpd
    s4 = optimal_nll(k, n_bits=N_BITS, squeeze=4).bpd
    assert s2 - s4 > 0.05
    torch.manual_seed(0)
    mean, stderr = fit(real_linear_flow(2, RES), k, 200, torch.Generator().manual_seed(1))
    print(f"2-level linear flow {mean:.4f} bpd within [{s4:.4f}, {s2:.4f}]")
    assert s4 - 4 * stderr - 1e-4 < mean < s2
