"""The spectral normalisers (pipeline/flows/lipschitz.py on spectral.py), float64: the symbol's
Grams from the taps' pairwise products against the definition (FFT of the zero-padded kernel,
all frequencies, full eigendecomposition), the certified normaliser within its slack, its
Rayleigh-quotient gradient against autograd through the eigenvalues, batching by level, and
that an invertible run's re-runs do not repeat the autograd-free part."""

from __future__ import annotations

import pytest
import torch

from pipeline.flows import ModelConfig, build_flow, spectral
from pipeline.flows.lipschitz import FourierNormaliser, LipschitzConv2d
from tests.conftest import count_group_top

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


def torus(shape: tuple[int, ...], spatial: tuple[int, int]) -> spectral.Frequencies:
    freq = spectral.frequencies(shape[2:], spatial)
    assert freq.route == "torus"  # these layers are small: the exact torus, no grid
    return freq


@pytest.mark.parametrize("shape, spatial", SHAPES)
def test_symbol_top_is_the_maximum_over_the_torus(shape, spatial):
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=torch.float64)
    top = spectral.symbol_top(weight, torus(shape, spatial)).item()
    assert top == pytest.approx(fft_reference(weight, spatial).item(), rel=1e-12)


@pytest.mark.parametrize("shape, spatial", SHAPES)
def test_both_routes_give_the_grams_of_the_definition(shape, spatial):
    """All pairwise products in one matmul, grouped by tap offset over a half plane, or the
    symbol's own products at each frequency: the same Grams, whose top eigenvalue over the
    frequencies is the definition's."""
    torch.manual_seed(4)
    weight = torch.randn(shape, dtype=torch.float64)
    freq = torus(shape, spatial)
    products = spectral.symbol_grams(weight, freq, route="products")
    offsets = spectral.symbol_grams(weight, freq, route="offsets")
    direct = spectral.symbol_grams(weight, freq, route="direct")
    torch.testing.assert_close(offsets, products, rtol=1e-12, atol=1e-12 * products.abs().max())
    torch.testing.assert_close(direct, products, rtol=1e-12, atol=1e-12 * products.abs().max())
    top = torch.linalg.eigvalsh(offsets)[:, -1].max().item()
    assert top == pytest.approx(fft_reference(weight, spatial).item(), rel=1e-12)


@pytest.mark.parametrize("shape, spatial", SHAPES)
def test_the_normaliser_is_certified_within_its_slack(shape, spatial):
    """What the normalisation divides by: ≥ the top over the torus, ≤ (1 + slack)·top once the
    warm-start vectors are warm; the Rayleigh quotient at the kept phases and eigenvector is the
    top to within the slack, so its gradient is the top eigenvalue's."""
    normaliser = FourierNormaliser(shape, spatial)
    slack = (1 + spectral.SLACKS[0]) * (1 + 4 * min(shape[:2]) * 2.0**-23) * (1 + 1e-12)
    for seed in range(5):
        torch.manual_seed(seed)
        weight = torch.randn(shape, dtype=torch.float64)[None]
        reference = fft_reference(weight[0], spatial).item()
        cold = torch.zeros(1, *normaliser.state_shape, dtype=torch.float64)
        top, vectors = normaliser.top(weight, cold, warmup=True, update=True)
        bound = normaliser.sigma_sq(weight, top).item()
        assert reference <= bound <= reference * slack
        at = spectral.rayleigh(spectral.symbol(weight, top.z), top.e).item()
        assert reference / slack <= at <= reference * (1 + 1e-12)
        warm, _ = normaliser.top(weight, vectors, warmup=False, update=False)  # the next step
        assert reference <= normaliser.sigma_sq(weight, warm).item() <= reference * slack


@pytest.mark.parametrize("shape, spatial", SHAPES)
def test_rayleigh_gradient_is_the_top_eigenvalues(shape, spatial):
    """With ω* and e held fixed, the gradient is that of the (simple) top eigenvalue: the same as
    autograd through the singular values of the definition."""
    torch.manual_seed(1)
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(fft_reference(weight, spatial), weight)
    normaliser = FourierNormaliser(shape, spatial)
    cold = torch.zeros(1, *normaliser.state_shape, dtype=torch.float64)
    top, _ = normaliser.top(weight.detach()[None], cold, warmup=True, update=False)
    value = spectral.rayleigh(spectral.symbol(weight[None], top.z), top.e)
    (got,) = torch.autograd.grad(value.sum(), weight)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (6, 6)])
def test_matrix_rayleigh_matches_the_eigenvalue_and_its_gradient(shape):
    torch.manual_seed(2)
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    e = torch.linalg.eigh(spectral.matrix_gram(w.detach()))[1][:, -1]
    value = spectral.rayleigh(spectral.matrix_side(w), e)
    assert value.item() == pytest.approx(torch.linalg.matrix_norm(w, ord=2).item() ** 2, rel=1e-12)
    (got,) = torch.autograd.grad(value, w)
    (expected,) = torch.autograd.grad(torch.linalg.matrix_norm(w, ord=2) ** 2, w)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_a_zero_kernel_is_normalised_without_nan():
    conv = LipschitzConv2d(3, 4, 3, coeff=0.5, method="fourier", spatial=(4, 4), zero_init=True)
    conv = conv.double()
    conv(torch.randn(2, 3, 4, 4, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(conv.weight.grad).all()


def test_levels_normalise_in_batches_and_rerun_modes_reuse_the_eigen_part(monkeypatch):
    """store mode: each level normalises each conv position of its couplings in one batch (one
    group_top per group per step); invertible and checkpoint re-run every block in the backward
    pass, where each conv normalises itself with its autograd-free part once per step, not once
    per re-run; the gradients agree with store mode."""
    calls = count_group_top(monkeypatch)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5
    grads, counts = {}, {}
    for memory in ("store", "invertible", "checkpoint"):
        torch.manual_seed(3)
        model = build_flow(ModelConfig(levels=2, steps=2, width=8, memory=memory), (3, 8, 8), 8)
        model = model.double()
        model.data_init(x)
        calls[0] = 0
        model(x)["bpd"].mean().backward()
        counts[memory] = calls[0]
        grads[memory] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    convs = [m for m in model.modules() if isinstance(m, LipschitzConv2d)]
    groups = sum(len(level.spectral_groups) for level in model.levels)
    assert groups == 3 * len(model.levels) and len(convs) == 2 * groups
    assert counts == {"store": groups, "invertible": len(convs), "checkpoint": len(convs)}
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


def test_a_checkpoint_without_warm_start_vectors_loads_and_warms_up():
    """State dicts from before the normalisers kept vectors (issue 21) load strictly: the layers
    start cold, warm up at their first use, and give the model that was saved."""
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64) - 0.5
    torch.manual_seed(0)
    saved = build_flow(ModelConfig(levels=2, steps=2, width=8), (3, 8, 8), 5).double()
    saved.data_init(x)
    old = {k: v for k, v in saved.state_dict().items() if "spectral_" not in k}
    assert len(old) < len(saved.state_dict())
    torch.manual_seed(1)
    loaded = build_flow(ModelConfig(levels=2, steps=2, width=8), (3, 8, 8), 5).double()
    loaded.load_state_dict(old, strict=True)
    convs = [m for m in loaded.modules() if isinstance(m, LipschitzConv2d)]
    assert convs and not any(conv._warm for conv in convs)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(x)["bpd"], saved.eval()(x)["bpd"], rtol=1e-12, atol=1e-12
        )
    assert all(conv._warm and conv.spectral_warm.item() == 1 for conv in convs)
