"""Closed-form likelihood optimum of linear per-position flows (docs/design.md §3.2).

A flow made only of channel mixing after a squeeze of factor s sees an image [C, H, W] as N = HW/s²
position vectors x_n of c = C·s² channels and maps each by one shared c×c matrix W (plus a bias b
when the flow has a free bias, e.g. actnorm), so log|det J| = N·log|det W| and

    log p(x) = -(N/2)·[c·ln 2π + tr(WᵀW R) - 2·ln|det W|],   R = (1/N) Σ_n (x_n - μ)(x_n - μ)ᵀ

(μ = mean position vector when centred, 0 otherwise). It is maximised at WᵀW = R⁻¹:

    log p*(x) = -(N/2)·[c·ln(2πe) + Σ_k ln λ_k(R)]                                   (nats)
    bpd*      = -log p*(x) / (N·c·ln 2) + n = n + ½·log2(2πe) + (1/(2c))·Σ_k log2 λ_k(R)

with n-bit data x = k/2^n - 1/2 + U(0, 2^-n) (the +n turns the density of x into bits of the integer
levels k). "pooled" uses R averaged over the data set (the optimum of one W shared by all images:
the number a trained linear flow must reach); "per_image" averages each image's own optimum (≤
pooled in NLL, since each image may pick its own W). If R is singular (e.g. N < c positions) the
optimum is unbounded: NLL = -inf, reported with a reason, never raised.

Dequantisation. Integer inputs (the levels k) have their uniform noise integrated exactly: R is
linear in the outer products, and E_u[(m + u)(m + u)ᵀ] = m mᵀ + (4^-n/12)·I for bin midpoints
m = (k + ½)/2^n - ½, so R = R(midpoints) + (4^-n/12)·I is the R of the *expected* training objective
(principle 5: dequantisation keeps the optimum finite). A constant image then has R = (4^-n/12)·I
when centred, and bpd* = n + ½·log2(2πe) + ½·log2(4^-n/12) = ½·log2(2πe/12) ≈ 0.2546 for every n.
Float inputs are taken as already dequantised x (sampled noise) and used as they are.

All moments and eigenvalues are float64; the data set is streamed, never held.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from pipeline.data.quantise import dequantise
from pipeline.io import json_safe

Mode = Literal["pooled", "per_image"]
MODES: tuple[str, ...] = ("pooled", "per_image")
LOG_2PIE = math.log(2.0 * math.pi * math.e)


@dataclass(frozen=True)
class Optimum:
    """The optimum of the linear class on some data, in nats and bits per dimension."""

    mode: str
    squeeze: int
    centered: bool
    n_bits: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    positions: int  # N = HW/s²
    channels: int  # c = C·s²
    num_images: int
    nll: float  # -log p*(x) per image in nats (mean over images for per_image); -inf if unbounded
    nll_per_dim: float  # nll / (N·c), nats
    bpd: float  # nll_per_dim / ln 2 + n_bits
    bounded: bool
    reason: str = ""  # why the optimum is unbounded; empty when bounded
    unbounded_images: int = 0  # per_image: how many images have a singular R
    eigenvalues: tuple[float, ...] = ()  # pooled: λ_k(R), descending
    hflip: bool = False  # each image counted with its mirror (the loader's data.hflip)

    def to_dict(self) -> dict:
        """JSON-ready: non-finite floats become the strings "inf", "-inf", "nan"."""
        return json_safe(asdict(self))


def position_vectors(x: torch.Tensor, squeeze: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, c] float64: per-position channel vectors after a squeeze of factor s.

    The order of the c channels inside a vector does not matter here (eigenvalues of R are invariant
    to permutations), only which pixels share a position.
    """
    if x.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    s = int(squeeze)
    if s < 1 or h % s or w % s:
        raise ValueError(f"squeeze {s} must be ≥ 1 and divide the image size {h}x{w}")
    x = x.to(torch.float64).reshape(b, c, h // s, s, w // s, s)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // s) * (w // s), c * s * s)


def dequantization_variance(n_bits: int) -> float:
    """Variance 4^-n/12 of the dequantisation noise U(0, 2^-n) added to each dimension."""
    return 4.0 ** (-n_bits) / 12.0


def levels_to_midpoints(k: torch.Tensor, n_bits: int) -> torch.Tensor:
    """n-bit levels k -> bin midpoints (k + ½)/2^n - ½ = E[x | k] in float64."""
    if k.is_floating_point():
        raise TypeError("levels must be an integer tensor")
    top = int(k.max()) if k.numel() else 0
    if int(k.min() if k.numel() else 0) < 0 or top >= 2**n_bits:
        raise ValueError(
            f"levels must lie in [0, {2**n_bits - 1}] for n_bits={n_bits}, max is {top}"
        )
    return dequantise(k.to(torch.float64), n_bits, 0.5)


def closed_form_nll(eigenvalues: torch.Tensor, positions: int) -> torch.Tensor:
    """-log p*(x) = (N/2)·[c·ln(2πe) + Σ_k ln λ_k(R)] in nats, over the last dim of ``eigenvalues``.

    -inf where R is numerically singular (λ_min ≤ c·eps·λ_max, the rank test numpy uses).
    """
    lam = eigenvalues.to(torch.float64)
    c = lam.shape[-1]
    nll = 0.5 * positions * (c * LOG_2PIE + torch.log(lam.clamp_min(1e-300)).sum(-1))
    return torch.where(singular(lam), torch.full_like(nll, -math.inf), nll)


def singular(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Rank-deficiency test on ascending or unordered eigenvalues of a PSD matrix (last dim)."""
    lam = eigenvalues.to(torch.float64)
    top = lam.max(-1).values
    tol = lam.shape[-1] * torch.finfo(torch.float64).eps * top
    return (lam.min(-1).values <= tol) | (top <= 0)


def bits_per_dim(nll: float, dims: int, n_bits: int) -> float:
    """bpd = nll / (D·ln 2) + n."""
    return nll / (dims * math.log(2.0)) + n_bits


def optimum_from_correlation(
    R: torch.Tensor,
    *,
    positions: int,
    n_bits: int,
    image_shape: tuple[int, int, int],
    squeeze: int = 2,
    centered: bool = True,
    num_images: int = 0,
    mode: str = "pooled",
    samples: int | None = None,
    hflip: bool = False,
) -> Optimum:
    """The optimum for one c×c auto-correlation (or covariance) matrix R and N positions per image.

    ``samples`` (position vectors behind R, if R came from finite data without dequantisation noise)
    only sharpens the reason given when R is singular.
    """
    R = R.to(torch.float64)
    c = R.shape[-1]
    lam = torch.linalg.eigvalsh(0.5 * (R + R.T))
    nll = float(closed_form_nll(lam, positions))
    reason = ""
    if not math.isfinite(nll):
        reason = (_unbounded_by_count(samples, c, centered) if samples is not None else "") or (
            f"R is singular (λ_min = {float(lam[0]):.3g}, λ_max = {float(lam[-1]):.3g}): a linear "
            "flow can shrink the missing directions without limit"
        )
    dims = positions * c
    return Optimum(
        mode=mode,
        squeeze=squeeze,
        centered=centered,
        n_bits=n_bits,
        image_shape=tuple(image_shape),
        positions=positions,
        channels=c,
        num_images=num_images,
        nll=nll,
        nll_per_dim=nll / dims,
        bpd=bits_per_dim(nll, dims, n_bits),
        bounded=bool(math.isfinite(nll)),
        reason=reason,
        eigenvalues=tuple(float(v) for v in lam.flip(0)),
        hflip=hflip,
    )


class MomentAccumulator:
    """Streams position vectors into a float64 mean and scatter matrix (Chan's parallel update).

    Merging centred batch scatters keeps R accurate when the mean is large against the spread, which
    a raw Σ x xᵀ - N μμᵀ would not.
    """

    def __init__(self, channels: int):
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.scatter = torch.zeros(channels, channels, dtype=torch.float64)

    def update(self, v: torch.Tensor) -> None:
        """Add rows of ``v`` [M, c]."""
        v = v.to(torch.float64).reshape(-1, self.mean.numel())
        m = v.shape[0]
        if m == 0:
            return
        mean_b = v.mean(0)
        d = v - mean_b
        delta = mean_b - self.mean
        total = self.count + m
        self.scatter += d.T @ d + torch.outer(delta, delta) * (self.count * m / total)
        self.mean += delta * (m / total)
        self.count = total

    def correlation(self, centered: bool) -> torch.Tensor:
        """R = (1/M) Σ (v - μ)(v - μ)ᵀ if centred, else (1/M) Σ v vᵀ."""
        if self.count == 0:
            raise ValueError("no data was accumulated")
        R = self.scatter / self.count
        return R if centered else R + torch.outer(self.mean, self.mean)


def _unbounded_by_count(samples: int, channels: int, centered: bool) -> str:
    """The structural reason: R built from M vectors has rank ≤ M (M - 1 when centred)."""
    rank = samples - 1 if centered else samples
    if rank < channels:
        what = "M - 1" if centered else "M"
        return (
            f"R is built from M = {samples} position vectors, so rank(R) ≤ {what} = {rank} < "
            f"c = {channels} channels (N < c, and no dequantisation noise to fill the rest)"
        )
    return ""


def optimal_nll(
    batches: Iterable[torch.Tensor] | torch.Tensor,
    *,
    n_bits: int,
    squeeze: int = 2,
    mode: Mode = "pooled",
    centered: bool = True,
    hflip: bool = False,
) -> Optimum:
    """Optimum of the linear class (docs/design.md §3.2) over a stream of image batches [B, C, H, W].

    Integer batches hold n-bit levels k in [0, 2^n) and have their dequantisation integrated exactly
    (R = R(midpoints) + 4^-n/12·I, see the module docstring); float batches are dequantised x in
    [-1/2, 1/2) as the loader yields them. ``centered`` subtracts the mean position vector (the flow
    has a free bias, e.g. actnorm): pooled uses the data set mean (one bias shared by all images),
    per_image each image's own. ``hflip`` gives each image and its mirror equal weight: the
    objective of a loader that flips with probability ½ (data.hflip). The mirror permutes the
    channels of each position, so the pooled R mixes R with its permutation and the optimum rises.

    Never raises for an unbounded optimum: it returns nll = -inf, bounded=False and the reason.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    shape: tuple[int, int, int] | None = None
    integer: bool | None = None
    acc: MomentAccumulator | None = None
    num_images = 0
    nll_sum = 0.0
    unbounded = 0
    eps_var = dequantization_variance(n_bits)
    for batch in batches:
        if batch.numel() == 0:
            continue
        if shape is None:
            shape = tuple(batch.shape[1:])
            integer = not batch.is_floating_point()
        if tuple(batch.shape[1:]) != shape:
            raise ValueError(
                f"all images must share one shape; got {shape} and {tuple(batch.shape[1:])}"
            )
        if (not batch.is_floating_point()) != integer:
            raise TypeError("do not mix integer levels and float images in one stream")
        x = levels_to_midpoints(batch, n_bits) if integer else batch.to(torch.float64)
        v = position_vectors(x, squeeze)  # [B, N, c]
        if hflip:
            v = torch.cat([v, position_vectors(x.flip(-1), squeeze)], dim=1)
        num_images += v.shape[0]
        if mode == "pooled":
            if acc is None:
                acc = MomentAccumulator(v.shape[-1])
            acc.update(v)
        else:
            if centered:
                v = v - v.mean(1, keepdim=True)
            R = v.transpose(1, 2) @ v / v.shape[1]
            if integer:
                R = R + eps_var * torch.eye(R.shape[-1], dtype=torch.float64)
            nll = closed_form_nll(torch.linalg.eigvalsh(R), x.shape[2] * x.shape[3] // squeeze**2)
            unbounded += int((~torch.isfinite(nll)).sum())
            nll_sum += float(nll[torch.isfinite(nll)].sum())
    if shape is None:
        raise ValueError("no images: the stream was empty")

    positions = shape[1] * shape[2] // squeeze**2
    channels = shape[0] * squeeze**2
    common = dict(
        squeeze=squeeze,
        centered=centered,
        n_bits=n_bits,
        image_shape=shape,
        num_images=num_images,
        mode=mode,
        hflip=hflip,
    )
    if mode == "pooled":
        R = acc.correlation(centered)
        if integer:
            R = R + eps_var * torch.eye(channels, dtype=torch.float64)
        samples = None if integer else acc.count
        return optimum_from_correlation(R, positions=positions, samples=samples, **common)

    dims = positions * channels
    if unbounded:
        samples = positions * (2 if hflip else 1)  # position vectors behind each image's R
        why = "" if integer else _unbounded_by_count(samples, channels, centered)
        reason = why or "their R is singular"
        reason = f"{unbounded} of {num_images} images have an unbounded optimum: {reason}"
        nll = -math.inf
    else:
        reason = ""
        nll = nll_sum / num_images
    return Optimum(
        positions=positions,
        channels=channels,
        nll=nll,
        nll_per_dim=nll / dims,
        bpd=bits_per_dim(nll, dims, n_bits),
        bounded=not unbounded,
        reason=reason,
        unbounded_images=unbounded,
        **common,
    )
