"""Gaussian images with a known covariance, and their analytic linear-flow optimum (docs/design.md §3.2).

Each squeezed position vector (c = 3·s² channels, N = HW/s² per image) is drawn i.i.d. from N(mean,
Σ), quantised to n bits like a PNG pixel (k = clip(floor((x + ½)·2^n), 0, 2^n - 1)) and, for the
loader's float layout, dequantised as x = k/2^n - ½ + U(0, 2^-n). The position vectors of the data
then have covariance

    Σ_x = Σ + (4^-n/6)·I

(Sheppard: quantising adds 4^-n/12, the uniform dequantisation another 4^-n/12), exact up to terms
of order exp(-2π²·λ_min(Σ)·4^n) and the clipping mass beyond ±½; keep λ_min(Σ) ≥ 4^-n and the
standard deviations ≤ 0.1 (``random_covariance``'s defaults do) and both are below 1e-8. The
analytic pooled optimum of the linear class is then

    bpd* = n + ½·log2(2πe) + (1/(2c))·Σ_k log2 λ_k(Σ_x)        (+ mean·meanᵀ in Σ_x if not centred)

A nonlinear flow can beat it only by modelling the step-shaped (non-Gaussian) density inside the
quantisation bins: the data's own entropy is close to that of N(mean, Σ), without the 4^-n/6 term.
"""

from __future__ import annotations

import math

import torch

from pipeline.data.quantise import dequantise
from pipeline.theory.closed_form import Optimum, dequantization_variance, optimum_from_correlation


def random_covariance(
    channels: int,
    *,
    n_bits: int = 5,
    max_std: float = 0.1,
    seed: int = 0,
) -> torch.Tensor:
    """A c×c float64 covariance Q·diag(λ)·Qᵀ, λ log-spaced in [4^-n, max_std²], Q random orthogonal.

    The range keeps the quantisation well resolved (λ ≥ bin²) and clipping negligible (5σ ≤ ½).
    """
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(channels, channels, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    lo = 4.0 ** (-n_bits)
    hi = max_std**2
    if lo >= hi:
        raise ValueError(f"max_std={max_std} is below one quantisation bin 2^-{n_bits}")
    lam = torch.logspace(math.log10(lo), math.log10(hi), channels, dtype=torch.float64)
    return (q * lam) @ q.T


def gaussian_images(
    num: int,
    cov: torch.Tensor,
    *,
    resolution: int,
    squeeze: int = 2,
    n_bits: int = 5,
    mean: float | torch.Tensor = 0.0,
    seed: int = 0,
    dequantize: bool = True,
) -> torch.Tensor:
    """``num`` images [num, 3, R, R] whose squeeze-s position vectors are i.i.d. N(mean, cov).

    dequantize=True gives float32 x = k/2^n - ½ + U(0, 2^-n) in [-½, ½), the loader's layout;
    dequantize=False gives the uint8 levels k (write PNGs with ``to_pixels``, or pass them to
    ``optimal_nll`` for the exact noise-integrated optimum of these very images).
    """
    cov = torch.as_tensor(cov, dtype=torch.float64)
    c = cov.shape[0]
    s = squeeze
    if c % (s * s) or resolution % s:
        raise ValueError(
            f"cov is {c}×{c}: need c = C·s² with s={s} dividing resolution={resolution}"
        )
    channels = c // (s * s)
    g = torch.Generator().manual_seed(seed)
    n = (resolution // s) ** 2
    chol = torch.linalg.cholesky(cov)
    v = torch.randn(num, n, c, generator=g, dtype=torch.float64) @ chol.T
    v = v + torch.as_tensor(mean, dtype=torch.float64)
    # inverse of position_vectors: [B, N, c] -> [B, C, H, W] with the same (C, s, s) channel order
    h = resolution // s
    x = v.reshape(num, h, h, channels, s, s).permute(0, 3, 1, 4, 2, 5)
    x = x.reshape(num, channels, resolution, resolution)
    k = torch.floor((x + 0.5) * 2**n_bits).clamp(0, 2**n_bits - 1).to(torch.uint8)
    if not dequantize:
        return k
    u = torch.rand(k.shape, generator=g, dtype=torch.float64)
    return dequantise(k.to(torch.float64), n_bits, u).to(torch.float32)


def gaussian_optimum(
    cov: torch.Tensor,
    *,
    resolution: int,
    squeeze: int = 2,
    n_bits: int = 5,
    mean: float | torch.Tensor = 0.0,
    centered: bool = True,
) -> Optimum:
    """Analytic pooled optimum for ``gaussian_images(…, cov, mean)``: R = Σ + 4^-n/6·I (+ mean
    meanᵀ)."""
    cov = torch.as_tensor(cov, dtype=torch.float64)
    c = cov.shape[0]
    R = cov + 2.0 * dequantization_variance(n_bits) * torch.eye(c, dtype=torch.float64)
    if not centered:
        m = torch.as_tensor(mean, dtype=torch.float64).expand(c)
        R = R + torch.outer(m, m)
    return optimum_from_correlation(
        R,
        positions=(resolution // squeeze) ** 2,
        n_bits=n_bits,
        image_shape=(c // squeeze**2, resolution, resolution),
        squeeze=squeeze,
        centered=centered,
        mode="gaussian",
    )
