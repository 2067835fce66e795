"""The spectral normalisation's eigen-part (pipeline/flows/lipschitz.py), float64: the Fourier norm
from the taps' pairwise products against the definition (FFT of the zero-padded kernel, all
frequencies, full eigendecomposition), its Rayleigh-quotient gradient against autograd through
the eigenvalues, and that an invertible run's re-runs do not repeat the eigensolves."""

from __future__ import annotations

import pytest
import torch

from pipeline.flows import ModelConfig, build_flow, lipschitz
from pipeline.flows.lipschitz import (
    CHOLESKY_SLACK,
    LipschitzConv2d,
    certified_top,
    fourier_bound,
    fourier_grams,
    fourier_norm_sq,
    fourier_rayleigh,
    fourier_top,
    gram_rayleigh,
    top_gram_eigenvalue,
    top_gram_vector,
)

SHAPES = [  # [c_out, c_in, k_h, k_w], (H, W): wide, tall, square, non-square kernels and images
    ((7, 5, 3, 3), (5, 5)),
    ((5, 7, 3, 3), (6, 4)),
    ((4, 4, 3, 1), (5, 3)),
    ((6, 3, 1, 3), (1, 7)),
    ((16, 6, 3, 3), (8, 8)),
    ((6, 16, 5, 5), (4, 9)),
]


def fft_reference(weight: torch.Tensor, spatial: tuple[int, int]) -> torch.Tensor:
    """max over every frequency of the torus (both halves) of σ_max(K̂(ω))², from the FFT of the
    zero-padded kernel and singular values of the c_out×c_in matrices, differentiable."""
    k_h, k_w = weight.shape[2:]
    n_h, n_w = max(spatial[0] + k_h // 2, k_h), max(spatial[1] + k_w // 2, k_w)
    k_hat = torch.fft.fft2(weight, s=(n_h, n_w)).permute(2, 3, 0, 1)
    return torch.linalg.matrix_norm(k_hat, ord=2).square().max()


@pytest.mark.parametrize("shape, spatial", SHAPES)
def test_fourier_top_is_the_maximum_over_the_torus(shape, spatial):
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=torch.float64)
    top, z, e = fourier_top(weight, spatial)
    reference = fft_reference(weight, spatial).item()
    assert top.item() == pytest.approx(reference, rel=1e-12)
    assert fourier_rayleigh(weight, z, e).item() == pytest.approx(reference, rel=1e-12)
    assert fourier_norm_sq(weight, spatial).item() == pytest.approx(reference, rel=1e-12)


@pytest.mark.parametrize("shape, spatial", SHAPES)
def test_both_routes_give_the_grams_of_the_definition(shape, spatial):
    """All pairwise products in one matmul, or grouped by tap offset over a half plane: the same
    Grams, whose top eigenvalue over the frequencies is the definition's."""
    torch.manual_seed(4)
    weight = torch.randn(shape, dtype=torch.float64)
    products = fourier_grams(weight, spatial, route="products")
    offsets = fourier_grams(weight, spatial, route="offsets")
    torch.testing.assert_close(offsets, products, rtol=1e-12, atol=1e-12 * products.abs().max())
    top = torch.linalg.eigvalsh(offsets)[:, -1].max().item()
    assert top == pytest.approx(fft_reference(weight, spatial).item(), rel=1e-12)


@pytest.mark.parametrize("shape, spatial", SHAPES)
def test_fourier_bound_is_certified_within_its_slack(shape, spatial):
    """What the normalisation divides by: ≥ the top over the torus, ≤ (1 + slack)·top, with the
    phases and eigenvector of a frequency whose top eigenvalue is within the slack of it."""
    for seed in range(5):
        torch.manual_seed(seed)
        weight = torch.randn(shape, dtype=torch.float64)
        reference = fft_reference(weight, spatial).item()
        bound, z, e = fourier_bound(weight, spatial)
        assert reference <= bound.item() <= reference * (1 + CHOLESKY_SLACK) * (1 + 1e-12)
        at = fourier_rayleigh(weight, z, e).item()
        assert reference / (1 + CHOLESKY_SLACK) <= at <= reference * (1 + 1e-12)


def test_certified_top_finds_the_top_from_the_worst_candidate():
    """A candidate frequency with the smallest top eigenvalue: the Cholesky test fails elsewhere,
    those frequencies' eigenvalues are computed, and the largest one is returned."""
    torch.manual_seed(0)
    grams = fourier_grams(torch.randn(6, 16, 3, 3, dtype=torch.float64), (8, 8))
    tops = torch.linalg.eigvalsh(grams)[:, -1]
    worst, best = int(tops.argmin()), int(tops.argmax())
    index, top, e = certified_top(grams, worst, CHOLESKY_SLACK)
    assert index == best and top.item() == pytest.approx(tops[best].item(), rel=1e-12)
    assert (e.conj() @ grams[best] @ e).real.item() == pytest.approx(top.item(), rel=1e-12)
    zero = torch.zeros_like(grams)
    assert certified_top(zero, 0, CHOLESKY_SLACK)[1].item() == 0.0


@pytest.mark.parametrize("shape, spatial", SHAPES)
def test_rayleigh_gradient_is_the_top_eigenvalues(shape, spatial):
    """With ω* and e held fixed, the gradient is that of the (simple) top eigenvalue: the same as
    autograd through the singular values of the definition."""
    torch.manual_seed(1)
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(fft_reference(weight, spatial), weight)
    (got,) = torch.autograd.grad(fourier_norm_sq(weight, spatial), weight)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (6, 6)])
def test_matrix_rayleigh_matches_the_eigenvalue_and_its_gradient(shape):
    torch.manual_seed(2)
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    value = gram_rayleigh(w, top_gram_vector(w))
    assert value.item() == pytest.approx(torch.linalg.matrix_norm(w, ord=2).item() ** 2, rel=1e-12)
    (got,) = torch.autograd.grad(value, w)
    (expected,) = torch.autograd.grad(top_gram_eigenvalue(w), w)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_a_zero_kernel_is_normalised_without_nan():
    conv = LipschitzConv2d(3, 4, 3, coeff=0.5, method="fourier", spatial=(4, 4), zero_init=True)
    conv = conv.double()
    conv(torch.randn(2, 3, 4, 4, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(conv.weight.grad).all()


def test_rerun_modes_reuse_the_eigensolves(monkeypatch):
    """memory=invertible and checkpoint re-run every block in the backward pass; the eigen-part of
    each spectral-normalised conv (fourier_bound, top_gram_vector) runs once per training step, as
    in store mode, and the gradients agree with store mode."""
    calls = {"fourier": 0, "matrix": 0}
    fourier, matrix = lipschitz.fourier_bound, lipschitz.top_gram_vector

    def counted_fourier(*args):
        calls["fourier"] += 1
        return fourier(*args)

    def counted_matrix(*args):
        calls["matrix"] += 1
        return matrix(*args)

    monkeypatch.setattr(lipschitz, "fourier_bound", counted_fourier)
    monkeypatch.setattr(lipschitz, "top_gram_vector", counted_matrix)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5
    grads, counts = {}, {}
    for memory in ("store", "invertible", "checkpoint"):
        torch.manual_seed(3)
        model = build_flow(ModelConfig(levels=2, steps=2, width=8, memory=memory), (3, 8, 8), 8)
        model = model.double()
        model.data_init(x)
        for key in calls:
            calls[key] = 0
        model(x)["bpd"].mean().backward()
        counts[memory] = dict(calls)
        grads[memory] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    convs = [m for m in model.modules() if isinstance(m, LipschitzConv2d)]
    three = sum(m.kernel_size == (3, 3) for m in convs)
    assert counts["store"] == {"fourier": three, "matrix": len(convs) - three}
    assert counts["invertible"] == counts["store"] == counts["checkpoint"]
    for memory in ("invertible", "checkpoint"):
        for a, b in zip(grads["store"], grads[memory], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kernel, method", [(3, "fourier"), (1, "fourier"), (3, "exact")])
def test_non_finite_weights_give_a_nan_layer_not_a_crash(kernel, method):
    """The eigensolvers fail on NaN; the layer then outputs NaN, which the training guard handles
    (skip, rollback), instead of raising out of the step."""
    conv = LipschitzConv2d(6, 16, kernel, coeff=1.5, method=method, spatial=(8, 8))
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    y = conv(torch.randn(2, 6, 8, 8))
    assert y.shape == (2, 16, 8, 8) and torch.isnan(y).all()
