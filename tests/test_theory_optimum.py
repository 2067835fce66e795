"""The closed-form linear-flow optimum (docs/design.md §3.2) against independent computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.__main__ import main
from pipeline.theory.closed_form import optimal_nll, position_vectors
from pipeline.theory.gaussian import gaussian_images, gaussian_optimum, random_covariance
from tests.data_helpers import write_set

CONSTANT_BPD = 0.5 * math.log2(2 * math.pi * math.e / 12)  # ≈ 0.2546


def smooth_images(num: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Float images in [-1/2, 1/2) with correlated colours and neighbours (sampled noise)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(num, 1, size // 4, size // 4, generator=g)
    base = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear")
    colour = torch.tensor([0.9, 0.6, 0.3]).view(1, 3, 1, 1)
    x = 0.12 * base * colour + 0.04 * torch.randn(num, 3, size, size, generator=g)
    return x.clamp(-0.49, 0.49).double()


def nll_of_linear_flow(W: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """-log p(x) of z_n = W x_n + b under N(0, I), log|det J| = N·log|det W| (no closed form)."""
    z = v @ W.T + b
    n, c = v.shape
    return (
        0.5 * (z * z).sum() + 0.5 * n * c * math.log(2 * math.pi) - n * torch.linalg.slogdet(W)[1]
    )


@pytest.mark.parametrize("centered", [True, False])
def test_closed_form_equals_numerical_optimum_of_w(centered):
    x = smooth_images(1, size=16, seed=1)
    v = position_vectors(x, 2)[0]  # [64, 12]
    W = torch.eye(12, dtype=torch.float64).requires_grad_(True)
    b = torch.zeros(12, dtype=torch.float64, requires_grad=centered)
    opt = torch.optim.LBFGS(
        [W, b] if centered else [W],
        lr=1,
        max_iter=2000,
        tolerance_grad=1e-13,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = nll_of_linear_flow(W, b, v)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    numerical = float(nll_of_linear_flow(W, b, v).detach())
    closed = optimal_nll(x, n_bits=8, squeeze=2, centered=centered).nll
    print(f"closed {closed!r} numerical {numerical!r} rel {abs(numerical / closed - 1):.1e}")
    assert abs(numerical - closed) <= 1e-6 * abs(closed), (numerical, closed)
    # and the optimum it found satisfies WᵀW = R⁻¹
    vc = v - v.mean(0) if centered else v
    R = vc.T @ vc / v.shape[0]
    assert torch.allclose(
        W.detach().T @ W.detach() @ R, torch.eye(12, dtype=torch.float64), atol=1e-5
    )


def ppca_nll(R: torch.Tensor, positions: int, q: int) -> float:
    """-log L of maximum-likelihood PPCA with q components (Tipping & Bishop 1999), evaluated
    directly as a Gaussian N(0, C), C = W Wᵀ + σ²I, W = U_q (Λ_q - σ²I)^½, σ² = mean of the rest."""
    lam, U = torch.linalg.eigh(R)
    lam, U = lam.flip(0), U.flip(1)
    c = R.shape[0]
    sigma2 = float(lam[q:].mean()) if q < c else 0.0
    W = U[:, :q] * (lam[:q] - sigma2).clamp_min(0).sqrt()
    C = W @ W.T + sigma2 * torch.eye(c, dtype=R.dtype)
    logdet = torch.linalg.slogdet(C)[1]
    trace = torch.trace(torch.linalg.solve(C, R))
    return float(0.5 * positions * (c * math.log(2 * math.pi) + logdet + trace))


def test_ppca_relation_all_components_equal_closed_form_fewer_are_worse():
    x = smooth_images(1, size=32, seed=2)
    v = position_vectors(x, 2)[0]
    vc = v - v.mean(0)
    R = vc.T @ vc / v.shape[0]
    closed = optimal_nll(x, n_bits=8, squeeze=2).nll
    n = v.shape[0]
    assert ppca_nll(R, n, 12) == pytest.approx(closed, rel=1e-10)
    # with one component left out, σ² is that single eigenvalue: the same model, the same value
    assert ppca_nll(R, n, 11) == pytest.approx(closed, rel=1e-10)
    worse = [ppca_nll(R, n, q) for q in range(10, 0, -1)]
    assert all(w > closed + 1e-6 for w in worse)
    assert all(a < b for a, b in zip(worse, worse[1:]))  # monotone: fewer components, higher NLL


def test_per_image_is_at_most_pooled():
    x = smooth_images(12, size=16, seed=3)
    pooled = optimal_nll(x, n_bits=8, mode="pooled")
    per_image = optimal_nll(x, n_bits=8, mode="per_image")
    singles = [optimal_nll(x[i : i + 1], n_bits=8).nll for i in range(len(x))]
    assert per_image.nll == pytest.approx(sum(singles) / len(singles), rel=1e-12)
    assert per_image.nll < pooled.nll - 1.0
    assert per_image.bpd < pooled.bpd


@pytest.mark.parametrize("n_bits", [1, 3, 5, 8])
@pytest.mark.parametrize("mode", ["pooled", "per_image"])
def test_constant_image_gives_half_log2_2pie_over_12(n_bits, mode):
    k = torch.full((3, 3, 8, 8), (2**n_bits) // 3, dtype=torch.uint8)
    r = optimal_nll(k, n_bits=n_bits, squeeze=2, mode=mode)
    assert r.bounded
    assert r.bpd == pytest.approx(CONSTANT_BPD, abs=1e-12)
    assert abs(CONSTANT_BPD - 0.2546) < 1e-4


def test_constant_image_with_sampled_dequantisation_noise():
    n_bits = 5
    g = torch.Generator().manual_seed(0)
    k = torch.full((1, 3, 64, 64), 17, dtype=torch.float64)
    x = (k + torch.rand(k.shape, generator=g, dtype=torch.float64)) / 2**n_bits - 0.5
    r = optimal_nll(x, n_bits=n_bits, squeeze=2)
    # sample covariance of 1024 noise vectors: log-det bias ≈ -c(c+1)/(2N) nats, i.e. ≈ -0.005 bpd
    assert r.bpd == pytest.approx(CONSTANT_BPD, abs=0.02)


def test_streaming_over_batches_equals_one_pass():
    x = smooth_images(10, size=16, seed=4) + 0.3  # a large mean stresses the moment merging
    k = ((x + 0.5).clamp(0, 0.999) * 32).floor().to(torch.uint8)
    for mode in ("pooled", "per_image"):
        for centered in (True, False):
            one = optimal_nll(k, n_bits=5, mode=mode, centered=centered)
            streamed = optimal_nll([k[:3], k[3:4], k[4:]], n_bits=5, mode=mode, centered=centered)
            assert streamed.nll == pytest.approx(one.nll, rel=1e-12)
            assert streamed.num_images == 10


def test_hflip_is_the_optimum_of_the_mirror_augmented_data():
    x = smooth_images(8, size=16, seed=9)
    x[:, 0] = x[:, 0] + torch.linspace(-0.1, 0.1, 16, dtype=torch.float64)  # not mirror-symmetric
    both = torch.cat([x, x.flip(-1)])
    plain = optimal_nll(x, n_bits=5)
    mirrored = optimal_nll(x, n_bits=5, hflip=True)
    assert mirrored.hflip and mirrored.num_images == 8
    assert mirrored.nll == pytest.approx(optimal_nll(both, n_bits=5).nll, rel=1e-12)
    assert mirrored.nll > plain.nll + 1.0  # one W must now serve both orientations
    per_image = optimal_nll(x, n_bits=5, mode="per_image", hflip=True)
    singles = [optimal_nll(torch.stack([xi, xi.flip(-1)]), n_bits=5).nll for xi in x]
    assert per_image.nll == pytest.approx(sum(singles) / len(singles), rel=1e-12)
    symmetric = x + x.flip(-1)  # mirror-symmetric images: flipping changes nothing
    assert optimal_nll(symmetric, n_bits=5, hflip=True).nll == pytest.approx(
        optimal_nll(symmetric, n_bits=5).nll, rel=1e-12
    )


def test_invariant_to_per_pixel_orthogonal_colour_rotations():
    x = smooth_images(6, size=16, seed=5)
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    Q[:, 0] = -Q[:, 0]  # include a reflection
    xr = torch.einsum("ij,bjhw->bihw", Q, x)
    for mode in ("pooled", "per_image"):
        for centered in (True, False):
            a = optimal_nll(x, n_bits=5, mode=mode, centered=centered)
            b = optimal_nll(xr, n_bits=5, mode=mode, centered=centered)
            assert b.nll == pytest.approx(a.nll, rel=1e-10)
    # more generally an invertible colour map A shifts -log p* by exactly H·W·ln|det A| (the
    # linear class absorbs A), and a nonlinear colour map changes the value: the test can fail
    A = torch.tensor([[1.0, 0.2, 0.0], [0.0, 0.5, 0.1], [0.3, 0.0, 4.0]], dtype=torch.float64)
    shift = 16 * 16 * math.log(abs(float(torch.linalg.det(A))))
    xa = torch.einsum("ij,bjhw->bihw", A, x)
    assert optimal_nll(xa, n_bits=5).nll == pytest.approx(optimal_nll(x, n_bits=5).nll + shift)
    xn = torch.tanh(4 * x) / 4
    assert abs(optimal_nll(xn, n_bits=5).nll - optimal_nll(x, n_bits=5).nll) > 1.0


def test_singular_and_too_few_positions_are_reported_not_raised():
    x = smooth_images(2, size=16, seed=6)
    x[:, 1] = 0.0  # a dead colour channel: R is singular
    r = optimal_nll(x, n_bits=5)
    assert not r.bounded and r.nll == -math.inf and r.bpd == -math.inf
    assert "singular" in r.reason
    per = optimal_nll(x, n_bits=5, mode="per_image")
    assert not per.bounded and per.unbounded_images == 2 and per.nll == -math.inf

    tiny = smooth_images(3, size=4, seed=7)  # N = 4 positions < c = 12 channels per image
    per = optimal_nll(tiny, n_bits=5, mode="per_image")
    assert not per.bounded and "N < c" in per.reason and per.unbounded_images == 3
    assert json.loads(json.dumps(per.to_dict()))["nll"] == "-inf"
    # integer levels carry the exact dequantisation noise: the same images are bounded then
    k = ((tiny + 0.5) * 32).floor().clamp(0, 31).to(torch.uint8)
    assert optimal_nll(k, n_bits=5, mode="per_image").bounded


def test_gaussian_images_match_their_analytic_optimum():
    cov = random_covariance(12, n_bits=5, seed=3)
    k = gaussian_images(1500, cov, resolution=16, n_bits=5, seed=1, dequantize=False)
    x = gaussian_images(1500, cov, resolution=16, n_bits=5, seed=1)
    assert x.dtype == torch.float32 and float(x.min()) >= -0.5 and float(x.max()) < 0.5
    # the float images are the levels plus U(0, 2^-n), the loader's layout
    frac = (x.double() + 0.5) * 32 - k.double()
    assert float(frac.min()) >= 0 and float(frac.max()) < 1
    analytic = gaussian_optimum(cov, resolution=16, n_bits=5)
    exact_noise = optimal_nll(k, n_bits=5)
    sampled_noise = optimal_nll(x, n_bits=5)
    # 96 000 position vectors: sampling std of the empirical value is ≈ 1e-3 bpd
    assert exact_noise.bpd == pytest.approx(analytic.bpd, abs=4e-3)
    assert sampled_noise.bpd == pytest.approx(exact_noise.bpd, abs=2e-3)
    # the prediction is sharp enough to tell the quantisation terms apart: dropping one of the
    # two 4^-n/12 terms (quantisation, dequantisation) moves it by more than the tolerance
    lam = torch.linalg.eigvalsh(cov)
    one_term = (
        5 + 0.5 * math.log2(2 * math.pi * math.e) + float(torch.log2(lam + 4.0**-5 / 12).sum()) / 24
    )
    assert abs(one_term - exact_noise.bpd) > 0.01


def test_cli_streams_shards(tmp_path, capsys):
    rng = np.random.default_rng(0)
    smooth = smooth_images(12, size=16, seed=8).permute(0, 2, 3, 1).numpy()
    pixels = ((smooth + 0.5) * 255 + rng.integers(0, 8, smooth.shape)).clip(0, 255)
    pixels = pixels.astype(np.uint8)
    write_set(tmp_path / "16", 16, [5, 5, 2], [], image=lambda i, _: pixels[i])
    levels = torch.from_numpy(pixels >> 3).permute(0, 3, 1, 2)
    for mode in ("pooled", "per_image"):
        assert main(["optimum", "--shards", str(tmp_path / "16"), "--mode", mode, "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        want = optimal_nll(levels, n_bits=5, squeeze=2, mode=mode)
        assert got["num_images"] == 12 and got["image_shape"] == [3, 16, 16]
        assert got["bpd"] == pytest.approx(want.bpd, rel=1e-12)
        assert got["nll"] == pytest.approx(want.nll, rel=1e-12)
    assert (
        main(["optimum", "--shards", str(tmp_path / "16"), "--squeeze", "4", "--n-bits", "3"]) == 0
    )
    text = capsys.readouterr().out
    want = optimal_nll(torch.from_numpy(pixels >> 5).permute(0, 3, 1, 2), n_bits=3, squeeze=4)
    assert f"{want.bpd:.6f}" in text and "c = 48" in text
    assert main(["optimum", "--shards", str(tmp_path / "16"), "--hflip", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["hflip"] and got["nll"] == pytest.approx(
        optimal_nll(levels, n_bits=5, hflip=True).nll, rel=1e-12
    )
    # a folder of resolution subfolders: a clear error naming them, exit code 2
    assert main(["optimum", "--shards", str(tmp_path)]) == 2
    assert "16" in capsys.readouterr().err
