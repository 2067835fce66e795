"""The linear algebra of spectral normalisation: pure functions, batched over leading dimensions,
without autograd unless a docstring says otherwise. The nn modules are in lipschitz.py.

**The symbol of a convolution.** A k_h×k_w kernel K (taps K_t, t = (t_h, t_w)) has the symbol

    K̂(ω) = Σ_t K_t·e^{-i⟨ω, t⟩},    ω ∈ [0, 2π)²,

a c_out×c_in matrix-valued trigonometric polynomial. The zero-padded ("same") conv on any H×W is
a compression of the bi-infinite convolution, whose operator norm is s = sup_ω σ_max(K̂(ω)); so
s bounds the conv on every input size. Two ways to evaluate it on finitely many frequencies:

- **the torus** (exact for the layer's H×W): the zero-padded conv on H×W is a submatrix of the
  circular conv on any N_h×N_w torus with N ≥ H + k//2 (Sedghi et al. 2019), whose singular
  values are those of K̂ at the torus's N_h·N_w frequencies. Its maximum bounds the layer.
- **a fixed grid** (any H×W, cost independent of the image): the maximum over an M_h×M_w grid
  of frequencies, inflated by the factor below, bounds s and hence the layer on every H×W.

**The grid inflation, derived.** Let s be attained at ω* with unit vectors u, v, u^H·K̂(ω*)·v = s.
With c = ((k_h - 1)/2, (k_w - 1)/2) the kernel's centre, set

    R(ω) = Re( e^{i⟨ω - ω*, c⟩} · u^H·K̂(ω)·v ) = Re Σ_t (u^H K_t v)·e^{-i⟨ω*, c⟩}·e^{-i⟨ω, t - c⟩}.

Then R(ω*) = s and |R(ω)| ≤ σ_max(K̂(ω)) ≤ s everywhere. Along ω_h (ω_w fixed) R is a real
trigonometric polynomial of degree τ_h = (k_h - 1)/2 (frequencies t_h - c_h ∈ [-τ_h, τ_h]; for an
even k substitute ω = 2θ: integer degree k - 1 in θ, the same bound follows), and its sup is at
most s. The Bernstein–Szegő inequality (Szegő 1928) for a real trigonometric polynomial T of
degree n, T'² + n²·T² ≤ n²·‖T‖²_∞, says that φ = arccos(T/‖T‖) is n-Lipschitz; with ‖T‖ ≤ s the
same holds for arccos(R/s) along each axis. Walking from ω* to a grid point g along ω_h, then
along ω_w: arccos(R(g)/s) ≤ τ_h·|g_h - ω*_h| + τ_w·|g_w - ω*_w|. The nearest point of an M_h×M_w
grid is within π/M_h and π/M_w (mod 2π) of ω*, so, when π(τ_h/M_h + τ_w/M_w) ≤ π/2,

    σ_max(K̂(g)) ≥ |u^H K̂(g) v| ≥ R(g) ≥ s·cos(π(τ_h/M_h + τ_w/M_w))
    ⇒  s² ≤ max_g λ_max(K̂(g)K̂(g)^H) / cos²(π(τ_h/M_h + τ_w/M_w)).

For a 3×3 kernel (τ = 1) on the 32×32 grid the factor on s is 1/cos(π/16) = 1.0196: a layer
gives up 2% of its budget, where the sqrt(k_h·k_w)·‖W_mat‖ bound gives up between 0 and 67%.
tests/test_flows_spectral.py checks it against dense SVDs of zero-padded convs, including a
kernel whose symbol peaks halfway between grid points.

**Certifying the top without a host synchronisation.** λ_max over all frequencies needs an
eigen-decomposition of every frequency's Gram, far too costly per step. Instead each frequency
keeps a vector from the previous step (a warm start), refined by power steps; the largest
Rayleigh quotient λ_R is a lower bound, and one batched Cholesky factorisation of μI - G(ω) at
μ = λ_R·(1 + slack) certifies λ_max(G(ω)) < μ wherever it succeeds (a factorisation backward
stable in fp32: μ is inflated by 4·m·2⁻²³ for its rounding). Where it fails, a ladder of wider
margins (SLACKS) is tried at those frequencies (by bisection: a rung that passes certifies every
rung above it), and past its top the Frobenius norm ‖G(ω)‖_F ≥ λ_max stands in: certified,
looser (up to √m·λ_max). A lagging vector can take tens of steps to catch up, and with the
Frobenius norm as the only stand-in the layer's scale jumped when it did: the ladder keeps those
jumps to a rung's step. Every choice (which frequency, which bound) is a tensor op: no .item(), no
branch on values, so the normaliser compiles into one graph and never waits for the device. On a
CPU the factorisations run one matrix per thread (`factorises`): the cost is the Grams' matmuls
and the factorisations' own arithmetic (`python -m pipeline bench certificate` splits it).
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

# the fixed frequency grid (per axis), for layers whose torus has over GRID_SAVING times its
# frequencies (3×3 kernels on maps larger than 44×44: 64² and up)
GRID = 32
GRID_SAVING = 2
# the Cholesky certificate's rungs, relative margins above the warm-start Rayleigh quotient: the
# first, tested at every frequency, holds on almost every step; the later ones are tested only at
# the CANDIDATES frequencies where the first failed (a warm vector lags: near-equal tops, or a new
# top at another frequency), in one factorisation. A ladder, so that the bound moves by a rung's
# step (≤ 1.5x on σ̂ between neighbours) when a lagging vector catches up: with the Frobenius norm
# as the only stand-in (up to √m·λ_max), a layer's scale jumped by up to ~2x between steps and
# the loss with it, for several steps at any learning rate
SLACKS = (1e-4, 1e-2, 0.05, 0.2, 0.5, 1.0, 3.0)
CANDIDATES = 4
# multiply-adds symbol_grams' "offsets" route must save to pay for its ~25 extra small
# operations (~0.25 ms on a CPU core): below that, the single-matmul "products" route is faster
OFFSETS_MIN_SAVING = 7.5e6
_EPS32 = 2.0**-23
# the CPU factorisations' work per call (bytes of matrices): a chunk's shift, factorisation and
# clean-up stay in a core's cache
FACTOR_CHUNK_BYTES = 1 << 20


class Frequencies(NamedTuple):
    """Where a kernel's symbol is evaluated: the n_h × n_w torus or grid (its half spectrum:
    n_h·(n_w//2 + 1) frequencies), and the factor its maximum λ is multiplied by to certify."""

    n_h: int
    n_w: int
    inflation: float

    @property
    def count(self) -> int:
        return self.n_h * (self.n_w // 2 + 1)

    @property
    def route(self) -> str:
        return "torus" if self.inflation == 1.0 else "grid"


def frequencies(
    kernel_size: tuple[int, int], spatial: tuple[int, int], grid: int = GRID
) -> Frequencies:
    """The torus that holds the zero-padded conv on `spatial` (exact) unless it has more than
    GRID_SAVING times the fixed grid's frequencies, else the grid with its certified inflation:
    the grid's margin is only worth a real saving."""
    k_h, k_w = kernel_size
    torus = Frequencies(max(spatial[0] + k_h // 2, k_h), max(spatial[1] + k_w // 2, k_w), 1.0)
    on_grid = Frequencies(max(grid, k_h), max(grid, k_w), grid_inflation(kernel_size, grid, grid))
    return torus if torus.count <= GRID_SAVING * on_grid.count else on_grid


def grid_inflation(kernel_size: tuple[int, int], n_h: int, n_w: int) -> float:
    """1/cos²(π(τ_h/n_h + τ_w/n_w)), τ = (k - 1)/2: sup_ω σ_max(K̂)² ≤ this × the grid's maximum
    (see the module docstring)."""
    tau_h, tau_w = (kernel_size[0] - 1) / 2, (kernel_size[1] - 1) / 2
    angle = math.pi * (tau_h / n_h + tau_w / n_w)
    if angle >= math.pi / 2:
        raise ValueError(f"a {n_h}x{n_w} grid is too coarse for a {kernel_size} kernel")
    return 1.0 / math.cos(angle) ** 2


def symbol_grams(weight: torch.Tensor, freq: Frequencies, route: str | None = None) -> torch.Tensor:
    """[..., F, m, m] complex: G(ω) = A(ω)·A(ω)^H at the F = freq.count frequencies, for
    [..., c_out, c_in, k_h, k_w] kernels, with A = K̂ (m = c_out ≤ c_in) or K̂^T (m = c_in: the
    same nonzero singular values). Without autograd. With T = k_h·k_w taps M_t (K_t or
    K_t^T, [m, n]), G(ω) = Σ_{a,b} M_a·M_b^T·e^{-i⟨ω, a - b⟩}, by one of three routes to the same
    matrices (`route` forces one; the cost counted in m²·n multiply-adds):

    "products": all T² products in one matmul, then one [m², T²] × [T², 2F] matmul; few
    operations, cheapest for small layers.
    "offsets": the products grouped by offset d = a - b, D_d = Σ_a M_a·M_{a-d}^T over a half plane
    (D_{-d} = D_d^T): (T² + T)/2 products instead of T², in k_w + k_h - 1 matmuls of the kernel's
    views, then a DFT of the D_d; cheapest where m is large and the frequencies many.
    "direct": the symbol A(ω) = R + iI at each frequency, then G = R·R^T + I·I^T + i(I·R^T -
    R·I^T): 3 products per frequency, fewer than "offsets"' (T² + T)/2 where F is small (a 3×3
    kernel on the torus of a map of 4×4 or less)."""
    *batch, c_out, c_in, k_h, k_w = weight.shape
    n_taps, (m, n) = k_h * k_w, sorted((c_out, c_in))
    if route is None:
        offsets = (2 * k_h - 1) * (2 * k_w - 1)
        saved = m * m * (n * (n_taps**2 - n_taps) / 2 + freq.count * (2 * n_taps**2 - offsets + 1))
        route = "offsets" if saved > OFFSETS_MIN_SAVING else "products"
        if route == "offsets" and 3 * freq.count < (n_taps**2 + n_taps) / 2:
            route = "direct"
    with torch.no_grad():
        taps = weight.detach().reshape(-1, c_out, c_in, n_taps).permute(0, 3, 1, 2)  # [B,T,o,i]
        if c_out > c_in:
            taps = taps.transpose(-1, -2)  # M_t = K_t^T
        if route == "offsets":
            grams = _grams_by_offset(taps, k_h, k_w, freq)
        elif route == "direct":
            grams = _grams_direct(taps, k_h, k_w, freq)
        else:
            flat = taps.reshape(-1, n_taps * m, n)
            products = (flat @ flat.transpose(-1, -2)).reshape(-1, n_taps, m, n_taps, m)
            products = products.permute(0, 2, 4, 1, 3).reshape(-1, m * m, n_taps * n_taps)
            dft = _pair_dft(k_h, k_w, freq.n_h, freq.n_w, weight.dtype, weight.device)
            # [B, m², F, (re, im)] -> [B, F, m, m], contiguous: LAPACK's batched factorisations
            # run several times slower on a strided batch
            grams = (products @ dft).view(-1, m, m, freq.count, 2).permute(0, 3, 1, 2, 4)
            grams = torch.view_as_complex(grams.contiguous())
    return grams.reshape(*batch, freq.count, m, m)


def _grams_by_offset(taps: torch.Tensor, k_h: int, k_w: int, freq: Frequencies) -> torch.Tensor:
    """symbol_grams' "offsets" route: G(ω) = D_0 + Σ_{d ≠ 0 in a half plane} (D_d + D_d^T)·cos θ_d
    - i·(D_d - D_d^T)·sin θ_d, θ_d = ⟨ω, d⟩ ([B, T, m, n] taps in, [B, F, m, m] out). The D_d
    from P_{d_h}[c, c'] = Σ_r M_{r,c}·M_{r-d_h,c'}^T (tap row r, column c), one matmul of the
    kernel's views per row offset d_h > 0 (all column pairs) and one per column c for d_h = 0
    (the columns c' ≤ c: P_0 is symmetric); D_d = Σ_{c - c' = d_w} P_{d_h}[c, c']."""
    batch, _, m, n = taps.shape
    cos, sin = _offsets(k_h, k_w, freq.n_h, freq.n_w, taps.dtype, taps.device)
    # [B, k_w, m, k_h·n]: row (c, i), column (r, j) = M_{r,c}[i, j]; one copy of the kernel
    rows = taps.reshape(batch, k_h, k_w, m, n).permute(0, 2, 3, 1, 4).reshape(batch, k_w, m, -1)
    rows = rows.contiguous()
    by_column = rows.reshape(batch, k_w * m, k_h * n)
    blocks = []  # D_d in _offsets' order: d_h = 0 (d_w ≥ 0), then d_h > 0 (d_w from -(k_w - 1))
    zero_row = [rows[:, c] @ by_column[:, : (c + 1) * m].transpose(1, 2) for c in range(k_w)]
    for d_w in range(k_w):  # P_0[c, c - d_w] is columns (c - d_w)·m... of zero_row[c]
        blocks.append(
            sum(zero_row[c][..., (c - d_w) * m : (c - d_w + 1) * m] for c in range(d_w, k_w))
        )
    for d_h in range(1, k_h):
        p = by_column[..., d_h * n :] @ by_column[..., : (k_h - d_h) * n].transpose(1, 2)
        p = p.view(batch, k_w, m, k_w, m)
        for d_w in range(-(k_w - 1), k_w):
            columns = range(max(d_w, 0), k_w + min(d_w, 0))
            blocks.append(sum(p[:, c, :, c - d_w] for c in columns))
    blocks = torch.stack(blocks, 1)  # [B, offsets, m, m], the zero offset first
    rest, rest_t = blocks[:, 1:], blocks[:, 1:].transpose(-2, -1)
    real = blocks[:, :1].flatten(2) + cos.t() @ (rest + rest_t).flatten(2)
    imag = sin.t() @ (rest_t - rest).flatten(2)
    return torch.complex(real, imag).reshape(batch, -1, m, m)


def _grams_direct(taps: torch.Tensor, k_h: int, k_w: int, freq: Frequencies) -> torch.Tensor:
    """symbol_grams' "direct" route: A(ω) = Σ_t M_t·z_t(ω) = R + iI at each frequency, then
    G = R·R^T + I·I^T + i(P - P^T), P = I·R^T ([B, T, m, n] taps in, [B, F, m, m] out)."""
    batch, n_taps, m, n = taps.shape
    z = tap_phases((k_h, k_w), freq, taps.dtype, taps.device)  # [F, T]
    flat = taps.reshape(batch, n_taps, m * n)
    re = (z.real @ flat).view(-1, m, n)  # [B·F, m, n]
    im = (z.imag @ flat).view(-1, m, n)
    real = torch.baddbmm(re @ re.transpose(1, 2), im, im.transpose(1, 2))
    p = im @ re.transpose(1, 2)
    return torch.complex(real, p - p.transpose(1, 2)).view(batch, -1, m, m)


@functools.lru_cache(maxsize=64)
def _offsets(
    k_h: int, k_w: int, n_h: int, n_w: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of ⟨ω, d⟩ ([offsets - 1, frequencies], the half spectrum of the n_h × n_w grid)
    for the nonzero tap offsets d = (d_h, d_w) of a half plane, in the order d_h = 0 (d_w > 0),
    then each d_h > 0 with d_w from -(k_w - 1) to k_w - 1."""
    nonzero = [(0, d_w) for d_w in range(1, k_w)]
    nonzero += [(d_h, d_w) for d_h in range(1, k_h) for d_w in range(-(k_w - 1), k_w)]
    d = torch.tensor(nonzero, dtype=dtype, device=device).reshape(-1, 2)
    omega_h, omega_w = _half_spectrum(n_h, n_w, dtype, device)
    theta = d[:, :1] * omega_h + d[:, 1:] * omega_w
    return torch.cos(theta), torch.sin(theta)


@functools.lru_cache(maxsize=64)
def _half_spectrum(
    n_h: int, n_w: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ω_h, ω_w) of the half spectrum's frequencies, [F] each, row-major (a real kernel has
    K̂(-ω) = conj(K̂(ω)), with the same singular values)."""
    omega_h = 2 * math.pi * torch.arange(n_h, dtype=dtype, device=device) / n_h
    omega_w = 2 * math.pi * torch.arange(n_w // 2 + 1, dtype=dtype, device=device) / n_w
    return omega_h.repeat_interleave(len(omega_w)), omega_w.repeat(n_h)


@functools.lru_cache(maxsize=64)
def _taps(
    k_h: int, k_w: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column offset of each tap t in weight.flatten(-2)'s order."""
    rows = torch.arange(k_h, dtype=dtype, device=device).repeat_interleave(k_w)
    return rows, torch.arange(k_w, dtype=dtype, device=device).repeat(k_h)


@functools.lru_cache(maxsize=64)
def _pair_dft(
    k_h: int, k_w: int, n_h: int, n_w: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """[T², 2F]: (cos, sin) of -⟨ω, a - b⟩ for each ordered tap pair (a, b) and frequency ω."""
    tap_h, tap_w = _taps(k_h, k_w, dtype, device)
    omega_h, omega_w = _half_spectrum(n_h, n_w, dtype, device)
    diff_h = (tap_h[:, None] - tap_h[None, :]).reshape(-1, 1)
    diff_w = (tap_w[:, None] - tap_w[None, :]).reshape(-1, 1)
    angle = -(diff_h * omega_h + diff_w * omega_w)
    return torch.stack((torch.cos(angle), torch.sin(angle)), -1).flatten(1)


@functools.lru_cache(maxsize=64)
def tap_phases(
    kernel_size: tuple[int, int], freq: Frequencies, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """[F, T] complex: z_t(ω) = e^{-i⟨ω, t⟩} per frequency and tap, so that K̂(ω) = Σ_t K_t·z_t."""
    tap_h, tap_w = _taps(*kernel_size, dtype, device)
    omega_h, omega_w = _half_spectrum(freq.n_h, freq.n_w, dtype, device)
    phase = -(omega_h[:, None] * tap_h + omega_w[:, None] * tap_w)
    return torch.polar(torch.ones_like(phase), phase)


def symbol(weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """[..., m, n]: K̂ at the phases z [..., T] (differentiable), transposed where c_out > c_in so
    that its rows are the Gram side of symbol_grams."""
    phases = torch.view_as_real(
        z.to(torch.complex128 if weight.dtype == torch.float64 else torch.complex64)
    )
    k_hat = torch.view_as_complex(weight.flatten(-2) @ phases[..., None, :, :])  # [..., o, i]
    return k_hat.transpose(-1, -2) if weight.shape[-4] > weight.shape[-3] else k_hat


def rayleigh(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """‖e^H·A‖² = e^H·A·A^H·e for [..., m, n] matrices and unit [..., m] vectors held fixed: the
    top eigenvalue of A·A^H where e is its eigenvector, with the gradient of that eigenvalue
    (Hellmann–Feynman) at the cost of one matrix-vector product. Differentiable in A."""
    return (e.conj()[..., None] * a).sum(-2).abs().square().sum(-1)


def power_step(
    grams: torch.Tensor, vectors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two matrix-vector products per Gram: (v₁, v₁^H·G·v₁, v₂) with v_{k+1} = G·v_k/‖G·v_k‖, so
    the Rayleigh quotient (a lower bound on λ_max) is one power step fresher than the vectors
    given, and v₂ is the next step's warm start."""
    v1 = _unit((grams @ vectors[..., None])[..., 0], vectors)
    product = (grams @ v1[..., None])[..., 0]
    quotient = (v1.conj() * product).sum(-1).real.clamp_min(0.0)
    return v1, quotient, _unit(product, v1)


def subspace_step(
    grams: torch.Tensor, basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of subspace iteration with Rayleigh–Ritz on [..., m, m] Hermitian Grams from
    [..., m, k] bases: (top Ritz vector [..., m], its Ritz value [...] ≤ λ_max, the next basis).
    Where the top eigenvalues are close (wide square layers), a single power vector lags the
    top direction for many steps; k vectors track the top-k subspace, and the top Ritz value
    converges at the rate λ_{k+1}/λ_1 instead of λ_2/λ_1."""
    q = torch.linalg.qr(grams @ basis).Q
    ritz = q.transpose(-1, -2).conj() @ grams @ q  # [..., k, k]
    finite = torch.where(torch.isfinite(ritz), ritz, torch.zeros_like(ritz))  # NaN weights
    values, vectors = torch.linalg.eigh(finite)
    rotated = q @ vectors  # Ritz vectors, ascending
    return rotated[..., -1], values[..., -1].clamp_min(0.0), rotated


def _unit(product: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """product/‖product‖, or `previous` where the product vanishes (a zero kernel: the iteration
    resumes once the kernel becomes nonzero) or is not finite (NaN weights leave it unharmed)."""
    norm = torch.linalg.vector_norm(product, dim=-1, keepdim=True)
    return torch.where(norm > 1e-30, product / norm.clamp_min(1e-30), previous)


def certify(
    grams: torch.Tensor,
    lower: torch.Tensor,
    slacks: tuple[float, ...] = SLACKS,
    with_rung: bool = False,
    candidates: torch.Tensor | None = None,
    at_failures: int = 0,
):
    """[...]: a certified upper bound on max_ω λ_max(G(ω)) over the frequency axis (-3) of
    [..., F, m, m] Grams, given `lower` [...] ≤ it (the best Rayleigh quotient). Rung j tests
    μ_j = lower·(1 + slacks[j]) by a Cholesky factorisation of μ_j·I - G(ω): the first rung at
    every frequency (one batched factorisation), the later ones only at `candidates` [..., k]
    (frequency indices), or, with `at_failures` = k > 0, at the k frequencies where the first
    rung failed with the largest ‖G(ω)‖_F (a lagging warm vector's own quotient is low, so the
    quotients cannot point at it; the Frobenius norm bounds where λ_max can be large); at every
    frequency if neither. A frequency's bound is the lowest rung that passed there, or
    ‖G(ω)‖_F ≥ λ_max where none did (see the module docstring). The later rungs are searched by
    bisection (a rung that passes certifies every rung above it: μ_{j+1}·I - G ⪰ μ_j·I - G, with
    a margin of a rung's step, far above the factorisation's rounding), ⌈log₂(len(slacks))⌉
    batched factorisations of the k candidates each instead of one of all len(slacks) - 1 rungs
    at each; a candidate that passed the first rung, or whose search has ended, is factorised at
    μ = -∞ (LAPACK stops at the first pivot), so the later rungs cost little on a step where the
    warm vectors hold. Branch-free; a zero kernel gets 0. `with_rung`: also the rung that bounded
    the maximum ([...]: len(slacks) = the Frobenius norm somewhere), a diagnostic."""
    m, n_freq = grams.shape[-1], grams.shape[-3]
    real = torch.view_as_real(grams) if grams.is_complex() else grams[..., None]
    frobenius = real.square().sum((-3, -2, -1)).sqrt().to(lower.dtype)  # [..., F]
    mus = lower[..., None] * (1 + torch.tensor(slacks, dtype=lower.dtype, device=lower.device))
    # the first rung at every frequency
    passed = factorises(grams, mus[..., :1].expand(grams.shape[:-2]))  # [..., F]
    bound = torch.where(passed, mus[..., :1], frobenius.maximum(lower[..., None]))
    rung = torch.where(passed, 0.0, float(len(slacks)))
    if len(slacks) > 1:  # the later rungs at the candidates, by bisection
        if candidates is None and at_failures:
            failed = torch.where(passed, torch.full_like(frobenius, -math.inf), frobenius)
            candidates = failed.topk(min(at_failures, n_freq), -1).indices
        elif candidates is None:
            candidates = torch.arange(n_freq, device=grams.device).expand(*passed.shape)
        where = candidates[..., None, None].expand(*candidates.shape, m, m)
        tested = grams.gather(-3, where)  # [..., k, m, m]
        later = mus[..., 1:]  # [..., R]
        n_later = later.shape[-1]
        # the lowest passing later rung lies in [low, high] (n_later: none passes); a candidate
        # that passed the first rung (almost all, on almost every step) needs none: it is
        # factorised at μ = -∞, which stops at the first pivot (no host sync, no branch)
        first = passed.gather(-1, candidates)
        low = torch.zeros_like(candidates)
        high = torch.full_like(candidates, n_later)
        for _ in range(math.ceil(math.log2(n_later + 1))):
            mid = (low + high) // 2  # < n_later while low < high
            searching = (low < high) & ~first
            mu = later.gather(-1, mid.clamp_max(n_later - 1))
            ok = factorises(tested, torch.where(searching, mu, -math.inf))
            high = torch.where(searching & ok, mid, high)
            low = torch.where(searching & ~ok, mid + 1, low)
        lowest = low.clamp_max(n_later - 1)
        mu = later.gather(-1, lowest)  # [..., k]
        fresh = (low < n_later) & ~first
        at = torch.zeros_like(passed).scatter(-1, candidates, fresh)
        bound = torch.where(at, torch.zeros_like(bound).scatter(-1, candidates, mu), bound)
        rung_at = torch.zeros_like(rung).scatter(-1, candidates, 1.0 + lowest.to(rung))
        rung = torch.where(at, rung_at, rung)
    top = bound.amax(-1)
    certified = top * (1 + 4 * m * _EPS32)
    if not with_rung:
        return certified
    # the rung of the frequency that bounds the maximum (a zero kernel: rung 0)
    at_top = rung.gather(-1, bound.argmax(-1, keepdim=True))[..., 0]
    return certified, torch.where(top > 0, at_top, torch.zeros_like(at_top)).long()


def factorises(grams: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """[...] bool: whether the Cholesky factorisation of μ·I - G succeeds, for Hermitian
    [..., m, m] G and real μ [...] (its sign: LAPACK's, computed as -G + μ on the diagonal, the
    same numbers as μ·I - G). One custom op: opaque to torch.compile (one graph), and on a CPU
    run one matrix per thread (`_factor_info`)."""
    return _shifted_cholesky_info(grams, mu.to(grams.real.dtype)) == 0


@torch.library.custom_op("lipflow::shifted_cholesky_info", mutates_args=())
def _shifted_cholesky_info(grams: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """[...] int32: LAPACK's info of the Cholesky factorisation of μ·I - G (0: it succeeded)."""
    if grams.device.type != "cpu":
        return _factor_info(grams, mu)
    return _on_cpu_threads(_factor_info, grams, mu)


@_shifted_cholesky_info.register_fake
def _(grams: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    return grams.new_empty(grams.shape[:-2], dtype=torch.int32)


def _factor_info(grams: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    shifted = -grams
    shifted.diagonal(dim1=-2, dim2=-1).add_(mu[..., None])
    return torch.linalg.cholesky_ex(shifted).info


def _on_cpu_threads(function, matrices: torch.Tensor, *per_matrix: torch.Tensor) -> torch.Tensor:
    """function(matrices, *per_matrix) ([N, ...] out for [N, m, m] in) for [..., m, m] matrices
    and [...] tensors, on CPU chunks of FACTOR_CHUNK_BYTES, one LAPACK thread each, up to torch.get_num_threads() chunks
    at once. MKL's own threads synchronise many times inside each factorisation of these sizes:
    with two of them on a shared 2-core CPU, batched Cholesky factorisations of 192×192 to
    512×512 ran 2.5-15x slower than one thread (bench certificate), and one matrix per thread
    needs no synchronisation at all. Same result, bit for bit, as one call with one thread."""
    batch, m = matrices.shape[:-2], matrices.shape[-1]
    flat = matrices.reshape(-1, m, m)
    rest = [t.expand(batch).reshape(-1) for t in per_matrix]
    if flat.shape[0] == 0:
        out = function(flat, *rest)
        return out.reshape(*batch, *out.shape[1:])
    per = max(1, FACTOR_CHUNK_BYTES // (m * m * matrices.element_size()))
    chunks = list(zip(flat.split(per), *(t.split(per) for t in rest), strict=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threads > 1 and len(chunks) > 1:
            out = list(_pool(threads).map(lambda chunk: function(*chunk), chunks))
        else:
            out = [function(*chunk) for chunk in chunks]
    finally:
        torch.set_num_threads(threads)
    return torch.cat(out).reshape(*batch, *out[0].shape[1:])


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """Worker threads for _on_cpu_threads, per process (a forked child has none of its parent's
    threads), each with one intra-op thread."""
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(
            threads, "lipflow-lapack", initializer=torch.set_num_threads, initargs=(1,)
        )
    return _POOLS[key]


def matrix_gram(w_mat: torch.Tensor) -> torch.Tensor:
    """[..., m, m]: the smaller Gram matrix of [..., r, c] matrices (W·W^T or W^T·W)."""
    return (
        w_mat @ w_mat.transpose(-1, -2)
        if w_mat.shape[-2] <= w_mat.shape[-1]
        else (w_mat.transpose(-1, -2) @ w_mat)
    )


def matrix_side(w_mat: torch.Tensor) -> torch.Tensor:
    """W or W^T: the orientation whose rows are matrix_gram's side (for `rayleigh`)."""
    return w_mat if w_mat.shape[-2] <= w_mat.shape[-1] else w_mat.transpose(-1, -2)


def symbol_top(weight: torch.Tensor, freq: Frequencies) -> torch.Tensor:
    """[...]: max over the frequencies of λ_max(G(ω)) by full eigenvalue decompositions, times
    freq.inflation: the certified ‖conv‖₂² (certificates, tests). Without autograd."""
    with torch.no_grad():
        grams = symbol_grams(weight, freq)
        return torch.linalg.eigvalsh(grams)[..., -1].amax(-1).clamp_min(0.0) * freq.inflation
