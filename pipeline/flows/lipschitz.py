"""Convolutions with a certified operator-norm bound, optional spectral normalisation, and subnets.

For a k_h×k_w convolution with zero padding and stride 1, each input pixel enters at most k_h·k_w
output patches, so with W_mat the [C_out, C_in·k_h·k_w] reshaped kernel

    ‖conv‖₂ ≤ sqrt(k_h·k_w) · ‖W_mat‖₂                                            (certified)

Spectral normalisation (Miyato et al. 2018; as used by i-ResNet, Behrmann et al. 2019) rescales the
kernel by c / max(c, sqrt(k_h·k_w)·σ), σ = ‖W_mat‖₂ exactly or estimated by power iteration (see
LipschitzConv2d). The certified bound is always recomputed exactly from the rescaled kernel (float64
eigensolve of its Gram matrix). The sqrt(k_h·k_w) factor is what certification costs: a 3×3 layer
normalised this way has a true operator norm between c/3 and c, depending on how its taps align.

The exact norm, when the layer knows the H×W it acts on (`spatial`): a zero-padded conv on H×W
(padding p = k//2) is a submatrix of the circular conv on an N_h×N_w torus, N ≥ H + p (the input
embedded in zeros, the output restricted), whose singular values are those of the c_out×c_in
matrices K̂(ω) = Σ_taps K_tap·e^{-i⟨ω, tap⟩} at the torus's frequencies (Sedghi et al. 2019,
"The singular values of convolutional layers"). So

    ‖conv‖₂ ≤ max_ω σ_max(K̂(ω))        (certified, ≤ the sqrt(k_h·k_w) bound, often ~3× below)

`operator_bound` certifies with the smaller of the two; method "fourier" also normalises with it
(to within a factor 1 + CHOLESKY_SLACK, see fourier_bound), so a layer's certified norm is its
true norm and its whole budget c is usable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.flows.base import NoGradCache, compute_dtype, frozen, in_reuse_scope

# fourier_work above which the Fourier norm is skipped, in the normalisation and in certificates
# (the sqrt(k_h·k_w) bound stays valid); see fourier_work
FOURIER_MAX_WORK = 2e8
# multiply-adds fourier_grams' "offsets" route must save to pay for its ~25 extra small operations
# (~0.25 ms on a CPU core): below that, the single-matmul "products" route is faster (measured)
OFFSETS_MIN_SAVING = 7.5e6


# relative margin of fourier_bound's certificate: far above fp32 rounding in a Cholesky
# factorisation (~m·2⁻²⁴), far below anything training notices (a layer gives up 0.005% of c)
CHOLESKY_SLACK = 1e-4


def fourier_top(weight: torch.Tensor, spatial: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """The top of the spectrum of a [c_out, c_in, k_h, k_w] kernel's zero-padded conv on `spatial`
    = (H, W), computed without autograd: (λ, z, e) with λ = max_ω σ_max(K̂(ω))² over the torus that
    holds the conv (see the module docstring), z the maximising frequency's phase e^{-i⟨ω*, t⟩}
    per tap t, e the top eigenvector there (of the Gram on the smaller side). Exact: every
    frequency's eigenvalues (the certificates use it; the normalisation uses fourier_bound)."""
    with torch.no_grad():
        grams = fourier_grams(weight, spatial)
        index = int(torch.linalg.eigvalsh(grams)[:, -1].argmax())
        values, vectors = torch.linalg.eigh(grams[index])
    return values[-1].clamp_min(0.0), tap_phases(weight, spatial, index), vectors[:, -1]


def fourier_bound(
    weight: torch.Tensor, spatial: tuple[int, int], slack: float = CHOLESKY_SLACK
) -> tuple[torch.Tensor, ...]:
    """fourier_top's (λ, z, e) with λ a certified upper bound within a factor 1 + slack of the top
    instead of the top itself, at a fraction of the cost: no eigensolve at every frequency.

    A candidate frequency (the Gram with the largest Frobenius norm) gets the one exact eigensolve,
    λ_c; then μ = λ_c·(1 + slack) and a Cholesky factorisation of μI - G(ω) succeeds exactly where
    λ_max(G(ω)) < μ, for all frequencies at once (batched, ~1/5 of an eigensolve each). The few
    where it fails (measured: 5-6% on untrained models, 1-24% along a training run) get their
    eigenvalues, and a larger one found there becomes λ_c. Deterministic: the result is a
    function of the weights alone."""
    with torch.no_grad():
        grams = fourier_grams(weight, spatial)
        index = int(torch.view_as_real(grams).square().sum((-3, -2, -1)).argmax())
        index, top, e = certified_top(grams, index, slack)
    return top * (1 + slack), tap_phases(weight, spatial, index), e


def certified_top(
    grams: torch.Tensor, index: int, slack: float
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(index, λ, e): the exact top eigenpair of grams[index], the candidate, replaced by another
    frequency's where that one is larger, such that every frequency's λ_max < λ·(1 + slack)."""
    values, vectors = torch.linalg.eigh(grams[index])
    top = values[-1].clamp_min(0.0)
    shifted = -grams  # μI - G(ω) for every frequency
    shifted.diagonal(dim1=-2, dim2=-1).add_(top * (1 + slack))
    fails = torch.linalg.cholesky_ex(shifted).info != 0
    if bool(fails.any()) and bool(grams.any()):  # (a zero kernel fails everywhere, at λ = 0)
        rest = fails.nonzero().flatten()
        tops = torch.linalg.eigvalsh(grams[rest])[:, -1]
        best = int(tops.argmax())
        if tops[best] > top:  # the others are certified below top·(1 + slack) already
            index = int(rest[best])
            values, vectors = torch.linalg.eigh(grams[index])
            top = values[-1]
    return index, top, vectors[:, -1]


def fourier_grams(
    weight: torch.Tensor, spatial: tuple[int, int], route: str | None = None
) -> torch.Tensor:
    """[frequencies, m, m]: the Hermitian Grams H(ω) = A(ω)A(ω)ᴴ, A(ω) = Σ_t M_t·e^{-i⟨ω, t⟩}
    with M_t the kernel's taps K_t (m = c_out ≤ c_in) or their transposes (m = c_in: the
    conjugate of K̂ᴴK̂, with the same spectrum), on the half spectrum of the torus that holds the
    conv. Without autograd. With only T = k_h·k_w taps,

        H(ω) = Σ_{a,b} M_a·M_bᵀ·e^{-i⟨ω, a-b⟩}

    a DFT of the taps' pairwise products, by one of two routes to the same matrices, the cheaper
    for the layer's shape (`route` forces one; no FFT of a zero-padded kernel, no complex batched
    matmul in either):

    "products": all T² products in one [T·m, n] matmul, then one [m², T²] by [T², frequencies]
    matmul. Few operations: cheapest for small layers.
    "offsets": the products grouped by their offset d = a - b, D_d = Σ_a M_a·M_{a-d}ᵀ, one matmul
    per offset in a half plane (D_{-d} = D_dᵀ): (T² + T)/2 products instead of T², and a DFT over
    the offsets. About half the multiply-adds, for ~25 more operations: cheapest where m is large
    or the frequencies many (deep levels, large images)."""
    c_out, c_in, k_h, k_w = weight.shape
    n_h, n_w = torus(weight, spatial)
    n_taps, (m, n) = k_h * k_w, sorted((c_out, c_in))
    if route is None:
        frequencies = n_h * (n_w // 2 + 1)
        offsets = (2 * k_h - 1) * (2 * k_w - 1)
        # products: T²·m²·n + 2T²·m²·F; offsets: (T² + T)/2·m²·n + (offsets - 1)·m²·F
        saved = m * m * (n * (n_taps**2 - n_taps) / 2 + frequencies * (2 * n_taps**2 - offsets + 1))
        route = "offsets" if saved > OFFSETS_MIN_SAVING else "products"
    with torch.no_grad():
        taps = weight.detach().flatten(2).permute(2, 0, 1)  # [T, c_out, c_in]
        if c_out > c_in:
            taps = taps.transpose(1, 2)  # M_t = K_tᵀ
        if route == "offsets":
            return _grams_by_offset(taps, k_h, k_w, n_h, n_w)
        flat = taps.reshape(n_taps * m, n)
        products = (flat @ flat.t()).reshape(n_taps, m, n_taps, m)  # [a, :, b, :] = M_a·M_bᵀ
        products = products.permute(1, 3, 0, 2).reshape(m * m, n_taps * n_taps)
        dft = _gram_dft(k_h, k_w, n_h, n_w, weight.dtype, weight.device)
        # [m², frequencies, (re, im)] -> [frequencies, m, m] complex
        grams = (products @ dft).view(m, m, -1, 2).permute(2, 0, 1, 3).contiguous()
        return torch.view_as_complex(grams)


def _grams_by_offset(taps: torch.Tensor, k_h: int, k_w: int, n_h: int, n_w: int) -> torch.Tensor:
    """fourier_grams' "offsets" route: H(ω) = D_0 + Σ_{d in a half plane, d ≠ 0} (D_d + D_dᵀ)·cos θ_d
    - i·(D_d - D_dᵀ)·sin θ_d with θ_d = ⟨ω, d⟩, D_d = Σ_a M_a·M_{a-d}ᵀ ([T, m, n] taps in)."""
    m = taps.shape[1]
    pairs, cos, sin = _offsets(k_h, k_w, n_h, n_w, taps.dtype, taps.device)
    blocks = torch.stack(
        [
            taps[a].transpose(0, 1).reshape(m, -1) @ taps[b].transpose(0, 1).reshape(m, -1).t()
            for a, b in pairs
        ]
    )  # [offsets, m, m], the zero offset first
    rest, rest_t = blocks[1:], blocks[1:].transpose(-2, -1)
    # [frequencies, m²], contiguous: the batched eigensolvers and factorisations are several times
    # slower on a strided batch
    real = blocks[0].reshape(1, -1) + cos.t() @ (rest + rest_t).flatten(1)
    imag = sin.t() @ (rest_t - rest).flatten(1)
    return torch.complex(real.reshape(-1, m, m), imag.reshape(-1, m, m))


@functools.lru_cache(maxsize=64)
def _offsets(
    k_h: int, k_w: int, n_h: int, n_w: int, dtype: torch.dtype, device: torch.device
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """The tap offsets d = (d_h, d_w) of a half plane (d_h > 0, or d_h = 0 and d_w ≥ 0; zero
    first), each with its pairs' tap indices (a, b = a - d), and cos, sin of ⟨ω, d⟩ for the
    nonzero ones ([offsets - 1, frequencies], the half spectrum of the n_h × n_w torus)."""
    pairs, nonzero = [], []
    for d_h in range(k_h):
        for d_w in range(-(k_w - 1) if d_h else 0, k_w):
            a = [
                row * k_w + col
                for row in range(d_h, k_h)
                for col in range(max(d_w, 0), k_w + min(d_w, 0))
            ]
            b = [t - d_h * k_w - d_w for t in a]
            pairs.append((torch.tensor(a, device=device), torch.tensor(b, device=device)))
            if d_h or d_w:
                nonzero.append((d_h, d_w))
    d = torch.tensor(nonzero, dtype=dtype, device=device).reshape(-1, 2)
    freq_h = torch.arange(n_h, dtype=dtype, device=device) / n_h
    freq_w = torch.arange(n_w // 2 + 1, dtype=dtype, device=device) / n_w
    theta = 2 * math.pi * (d[:, 0, None, None] * freq_h[:, None] + d[:, 1, None, None] * freq_w)
    return pairs, torch.cos(theta.flatten(1)), torch.sin(theta.flatten(1))


def torus(weight: torch.Tensor, spatial: tuple[int, int]) -> tuple[int, int]:
    """Any torus of ≥ H + k_h//2 rows holds the conv; ≥ k_h rows so that no tap is cut off."""
    k_h, k_w = weight.shape[2:]
    return max(spatial[0] + k_h // 2, k_h), max(spatial[1] + k_w // 2, k_w)


def tap_phases(weight: torch.Tensor, spatial: tuple[int, int], index: int) -> torch.Tensor:
    """z_t = e^{-i⟨ω, t⟩} per tap t at the half spectrum's frequency number `index`."""
    n_h, n_w = torus(weight, spatial)
    u, v = divmod(index, n_w // 2 + 1)
    tap_h, tap_w = _taps(*weight.shape[2:], weight.dtype, weight.device)
    phase = -2 * math.pi * (tap_h * u / n_h + tap_w * v / n_w)
    return torch.polar(torch.ones_like(phase), phase)


@functools.lru_cache(maxsize=64)
def _taps(
    k_h: int, k_w: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column offset of each tap t in weight.flatten(2)'s order."""
    rows = torch.arange(k_h, dtype=dtype, device=device).repeat_interleave(k_w)
    return rows, torch.arange(k_w, dtype=dtype, device=device).repeat(k_h)


@functools.lru_cache(maxsize=64)
def _gram_dft(
    k_h: int, k_w: int, n_h: int, n_w: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """[T², frequencies·2]: column pair (cos, sin) of -⟨ω, a - b⟩ for each ordered tap pair (a, b)
    and each frequency ω of the n_h × n_w torus's half spectrum (a real kernel has
    K̂(-ω) = conj(K̂(ω)), with the same singular values)."""
    tap_h, tap_w = _taps(k_h, k_w, dtype, device)
    freq_h = torch.arange(n_h, dtype=dtype, device=device) / n_h
    freq_w = torch.arange(n_w // 2 + 1, dtype=dtype, device=device) / n_w
    diff_h = (tap_h[:, None] - tap_h[None, :]).reshape(-1, 1, 1)
    diff_w = (tap_w[:, None] - tap_w[None, :]).reshape(-1, 1, 1)
    angle = (-2 * math.pi * (diff_h * freq_h[:, None] + diff_w * freq_w[None, :])).flatten(1)
    return torch.stack((torch.cos(angle), torch.sin(angle)), -1).flatten(1)


def fourier_rayleigh(weight: torch.Tensor, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """eᴴ·G(ω*)·e with the frequency's phases z and the eigenvector e held fixed (fourier_top):
    the top eigenvalue's value and, where it is simple, its gradient (Hellmann-Feynman), at the
    cost of one frequency. Squared, so that a zero kernel has no sqrt of 0 in the backward pass."""
    k_star = (weight.flatten(2) * z).sum(-1)  # K̂(ω*), [c_out, c_in]
    if weight.shape[0] > weight.shape[1]:
        k_star = k_star.t()
    return (e.conj() @ k_star).abs().square().sum()


def fourier_norm_sq(weight: torch.Tensor, spatial: tuple[int, int]) -> torch.Tensor:
    """max_ω σ_max(K̂(ω))² of the zero-padded conv on `spatial` (see fourier_top); differentiable
    where autograd asks for it (fourier_rayleigh)."""
    top, z, e = fourier_top(weight, spatial)
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return top
    return fourier_rayleigh(weight, z, e)


def fourier_work(weight: torch.Tensor, spatial: tuple[int, int]) -> float:
    """Frequencies × (smaller Gram side)² × (larger side): the cost measure FOURIER_MAX_WORK caps.
    It decides which layers a model normalises by the Fourier norm, so it stays as it was when
    models were trained with it (fourier_top is now ~5-10× cheaper than this measure assumed)."""
    n_h, n_w = torus(weight, spatial)
    small, large = sorted(weight.shape[:2])
    return n_h * n_w * small * small * large


def top_gram_eigenvalue(w_mat: torch.Tensor) -> torch.Tensor:
    """λ_max(W·Wᵀ) = ‖W‖₂², from the smaller of the two Gram matrices (differentiable)."""
    gram = w_mat @ w_mat.t() if w_mat.shape[0] <= w_mat.shape[1] else w_mat.t() @ w_mat
    return torch.linalg.eigvalsh(gram)[-1]


def top_gram_vector(w_mat: torch.Tensor) -> torch.Tensor:
    """The top eigenvector of W's smaller Gram matrix, without autograd (see gram_rayleigh)."""
    with torch.no_grad():
        w_mat = w_mat.detach()
        gram = w_mat @ w_mat.t() if w_mat.shape[0] <= w_mat.shape[1] else w_mat.t() @ w_mat
        return torch.linalg.eigh(gram)[1][:, -1]


def gram_rayleigh(w_mat: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """‖W‖₂² as eᵀ·Gram·e with the top eigenvector e fixed (top_gram_vector): the value, and the
    gradient of the top eigenvalue (Hellmann-Feynman), from two matrix-vector products."""
    side = e @ w_mat if w_mat.shape[0] <= w_mat.shape[1] else w_mat @ e
    return side.square().sum()


class LipSwish(nn.Module):
    """x·sigmoid(βx)/1.1, learnable β > 0: smooth and Lip ≤ 1 (Chen et al. 2019, Residual Flows)."""

    def __init__(self):
        super().__init__()
        # shape (1,), not a 0-d tensor: DeepSpeed broadcasts parameters as byte views at start-up,
        # which a 0-d tensor cannot give
        self.beta_raw = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = F.softplus(self.beta_raw)
        return x * torch.sigmoid(beta * x) / 1.1


class LipschitzConv2d(nn.Conv2d):
    """A 'same' conv2d that reports a certified bound on its operator norm; spectral-normalised to
    ‖conv‖₂ ≤ coeff when coeff is given (see the module docstring).

    method "fourier": σ = the operator norm on `spatial` (max over the torus frequencies,
    differentiable), certified from above to within a factor sqrt(1 + CHOLESKY_SLACK), so
    ‖conv‖₂ ≈ coeff whenever the layer would exceed it: the layer may use all of its certified
    budget, where "exact" leaves it between coeff/sqrt(k_h·k_w) and coeff.

    method "exact": σ = sqrt(λ_max(W_mat·W_matᵀ)) by an eigensolve of the smaller Gram matrix at
    every training forward (differentiable), so the bound holds by construction. method "power": σ̂
    from `power_iterations` steps of persistent power iteration (Miyato et al. 2018), cheap for wide
    layers; σ̂ ≤ σ, and maximum-likelihood training actively grows the directions the stale estimate
    misses (measured: 10-25% over coeff after 100 Adam steps), so the certificate can exceed coeff.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int,
        coeff: float | None = None,
        method: Literal["exact", "power", "fourier"] = "exact",
        power_iterations: int = 1,
        zero_init: bool = False,
        spatial: tuple[int, int] | None = None,
    ):
        super().__init__(c_in, c_out, kernel_size, padding=kernel_size // 2)
        if method == "fourier" and coeff is not None and spatial is None:
            raise ValueError("spectral_method=fourier needs the layer's spatial size")
        self.coeff = coeff
        self.method = method
        self.spatial = None if spatial is None else tuple(spatial)
        self.power_iterations = power_iterations
        self.overlap = math.sqrt(kernel_size * kernel_size)  # taps per input pixel, square-rooted
        self._cache = NoGradCache()
        self._eval_weight: tuple[tuple, torch.Tensor] | None = None
        if zero_init:
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)
        if coeff is not None and method == "power":
            self.register_buffer("u", F.normalize(torch.randn(c_out), dim=0))
            self.register_buffer("v", F.normalize(torch.randn(c_in * kernel_size**2), dim=0))
            # converge once at construction; then `power_iterations` per step track the weights
            converge_spectral_norms(self, 50)

    @torch.no_grad()
    def _power_iteration(self, w_mat: torch.Tensor) -> None:
        u, v = self.u, self.v
        for _ in range(self.power_iterations):
            # keep the old vector where the new one vanishes (a zero-initialised kernel), so the
            # iteration restarts once the kernel becomes non-zero; no host sync needed
            v_new = w_mat.t() @ u
            v_norm = v_new.norm()
            v = torch.where(v_norm > 1e-12, v_new / v_norm.clamp_min(1e-12), v)
            u_new = w_mat @ v
            u_norm = u_new.norm()
            u = torch.where(u_norm > 1e-12, u_new / u_norm.clamp_min(1e-12), u)
        self.u.copy_(u)
        self.v.copy_(v)

    def effective_weight(self, update: bool | None = None) -> torch.Tensor:
        """The kernel actually used, W·coeff/max(coeff, sqrt(k_h·k_w)·σ). Power iteration advances
        only in training mode (or when asked). Without autograd the kernel is reused: within a
        `reuse_weights` scope (a fixed-point solve, an invertible run) at no cost, and elsewhere
        the exact kernel is cached until W's values change (evaluation)."""
        if self.coeff is None:
            return self.weight
        updating = self.method == "power" and (self.training if update is None else update)
        if not updating and not torch.is_grad_enabled() and in_reuse_scope():
            sources = [self.weight, *([self.u, self.v] if self.method == "power" else [])]
            return self._cache.get("weight", sources, lambda: self._normalised_weight(update))
        if self.method != "power" and not torch.is_grad_enabled():
            key = self._state_key(slice(None))
            if self._eval_weight is None or self._eval_weight[0] != key:
                self._eval_weight = (key, self._normalised_weight(update))
            return self._eval_weight[1]
        return self._normalised_weight(update)

    def _normalised_weight(self, update: bool | None) -> torch.Tensor:
        # the normalising scale is computed in (at least) fp32 even under autocast
        with torch.autocast(self.weight.device.type, enabled=False):
            w_mat = self.weight.flatten(1).to(compute_dtype(self.weight))
            method = self.method
            if method == "fourier" and self.kernel_size == (1, 1):
                method = "exact"  # a 1×1 kernel is the same matrix at every frequency: ‖W‖ exactly
            elif method == "fourier" and fourier_work(self.weight, self.spatial) > FOURIER_MAX_WORK:
                # too many frequencies × too wide (e.g. 256² images, width 512): every forward
                # would run thousands of large eigensolves; the sqrt(k_h·k_w)·‖W‖ bound is certified
                method = "exact"
            try:
                sigma_sq, overlap = self._sigma_sq(method, w_mat, update)
            except torch.linalg.LinAlgError:
                # non-finite weights make the eigensolvers fail: a NaN layer, so that the loss is
                # NaN and the training guard skips or rolls back, instead of a crash
                return torch.full_like(self.weight, math.nan)
            # compare squares: no sqrt of 0 (a zero-initialised kernel) in the backward pass
            bound_sq = torch.maximum(overlap**2 * sigma_sq, sigma_sq.new_tensor(self.coeff**2))
            scale = self.coeff / torch.sqrt(bound_sq)
            return self.weight * scale.to(self.weight.dtype)

    def _sigma_sq(
        self, method: str, w_mat: torch.Tensor, update: bool | None
    ) -> tuple[torch.Tensor, float]:
        """(σ², overlap): the normaliser by `method` and the factor it is taken with."""
        if method == "exact":
            e = self._top("matrix", lambda: top_gram_vector(w_mat))
            return gram_rayleigh(w_mat, e), self.overlap
        if method == "fourier":
            kernel = self.weight.to(w_mat.dtype)
            _, z, e = self._top("fourier", lambda: fourier_bound(kernel, self.spatial))
            # λ at the certified frequency, times the certificate's margin: ≥ every frequency's;
            # overlap 1: the norm itself (to the margin), not a bound on it
            return fourier_rayleigh(kernel, z, e) * (1 + CHOLESKY_SLACK), 1.0
        if self.training if update is None else update:
            self._power_iteration(w_mat.detach().to(self.u.dtype))
        return torch.dot(self.u.to(w_mat.dtype), w_mat @ self.v.to(w_mat.dtype)) ** 2, self.overlap

    def _top(self, name: str, compute: Callable[[], object]):
        """The eigen-part of the normalisation (which direction is the top one), without autograd:
        once per `reuse_weights` scope, so an invertible run's re-runs and a fixed-point solve's
        iterations only redo the cheap differentiable Rayleigh quotient."""
        with torch.no_grad():
            return self._cache.get(name, [self.weight], compute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def _state_key(self, rows: slice) -> tuple:
        # in-place updates (optimizer steps, load_state_dict, power iterations) bump _version; the
        # storage pointer and a fingerprint guard against a new tensor that restarts at version 0
        tensors = [self.weight] + ([self.u, self.v] if hasattr(self, "u") else [])
        w = self.weight.detach().double()
        fingerprint = (w.sum().item(), (w * w).sum().item())
        return (
            rows.start,
            rows.stop,
            fingerprint,
            self.weight.dtype,
            self.weight.device,
            *((t.data_ptr(), t._version) for t in tensors),
        )

    @torch.no_grad()
    def operator_bound(self, rows: slice = slice(None)) -> float:
        """Certified ‖conv‖₂ restricted to output channels `rows`: sqrt(k_h·k_w)·‖W_mat[rows]‖₂,
        with ‖W‖₂² the top eigenvalue of the smaller Gram matrix, in float64, or the Fourier norm
        on `spatial` where it is smaller and affordable (FOURIER_MAX_WORK). Cached until the
        kernel (or the spectral-norm state) changes: the eigensolve dominates `lipschitz_bound()`
        for wide models."""
        key = self._state_key(rows)
        cache = self.__dict__.setdefault("_bound_cache", {})
        if key not in cache:
            w_mat = self.effective_weight(update=False).flatten(1)[rows].double()
            if w_mat.numel() == 0:
                cache[key] = 0.0
            else:
                bound = self.overlap * top_gram_eigenvalue(w_mat).clamp_min(0.0).sqrt().item()
                kernel = self.effective_weight(update=False)[rows].double()
                if (
                    self.spatial is not None
                    and self.kernel_size != (1, 1)
                    and fourier_work(kernel, self.spatial) <= FOURIER_MAX_WORK
                ):
                    bound = min(bound, math.sqrt(fourier_norm_sq(kernel, self.spatial).item()))
                if len(cache) > 8:
                    cache.clear()
                cache[key] = bound
        return cache[key]

    @torch.no_grad()
    def inf_bound(self, rows: slice = slice(None)) -> float:
        """‖conv‖_∞→∞ ≤ max over the output channels `rows` of Σ |kernel| (the ∞-norm bound)."""
        w_mat = self.effective_weight(update=False).flatten(1)[rows].double()
        if w_mat.numel() == 0:
            return 0.0
        return w_mat.abs().sum(1).max().item()


class ConvNet(nn.Module):
    """conv3×3 → act → conv1×1 → act → conv3×3: Glow's coupling NN (its last layer zero-initialised,
    so each coupling starts as the identity) and, with LipSwish, the residual g of Residual Flows.

    Lip ≤ Π_layers ‖conv‖₂ (activations are 1-Lipschitz); `lipschitz_bound(rows)` certifies it for a
    subset of output channels. With coeff, each layer is normalised to coeff^(1/3). `spatial`, the
    H×W the net acts on, lets the layers certify (and, method "fourier", normalise) exactly.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        width: int,
        coeff: float | None = None,
        activation: str = "relu",
        zero_init: bool = True,
        method: Literal["exact", "power", "fourier"] = "exact",
        power_iterations: int = 1,
        spatial: tuple[int, int] | None = None,
    ):
        super().__init__()
        layer_coeff = None if coeff is None else coeff ** (1.0 / 3.0)

        def act() -> nn.Module:
            return nn.ReLU() if activation == "relu" else LipSwish()

        def conv(c_from: int, c_to: int, kernel: int, zero: bool = False) -> LipschitzConv2d:
            return LipschitzConv2d(
                c_from, c_to, kernel, layer_coeff, method, power_iterations, zero, spatial
            )

        self.layers = nn.Sequential(
            conv(c_in, width, 3),
            act(),
            conv(width, width, 1),
            act(),
            conv(width, c_out, 3, zero_init),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last is the native conv layout of oneDNN (CPU) and of cuDNN's tensor-core
        # kernels: given NCHW, every conv call, forward and backward, reorders (copies) its
        # tensors into it and back. Measured on the demo step (CPU): 10-18% faster.
        return self.layers(x.contiguous(memory_format=torch.channels_last)).contiguous()

    def lipschitz_bound(self, rows: slice = slice(None)) -> float:
        """Certified Lip (ℓ2) of the output channels `rows`: the product of layer operator norms."""
        convs = [m for m in self.layers if isinstance(m, LipschitzConv2d)]
        bound = convs[-1].operator_bound(rows)
        for conv in convs[:-1]:
            bound *= conv.operator_bound()
        return bound

    @torch.no_grad()
    def sup_bound(
        self, shape: tuple[int, int, int], x_bound: float, rows: slice = slice(None)
    ) -> float:
        """Certified sup |NN(x)[rows]| over inputs of `shape` with |x|_∞ ≤ x_bound:
        |NN(0)|_∞ + x_bound·Π ‖conv‖_∞→∞ (activations are 1-Lipschitz in every norm). On the zero
        image the first two layers output constants (their biases), so NN(0) varies with position
        only through which taps of the last 3×3 conv fall inside the image; a zero image of
        min(H, 3)×min(W, 3) pixels shows every such case."""
        convs = [m for m in self.layers if isinstance(m, LipschitzConv2d)]
        lip_inf = convs[-1].inf_bound(rows)
        for conv in convs[:-1]:
            lip_inf *= conv.inf_bound()
        c, h, w = shape
        param = convs[0].weight
        with frozen(self):
            zero = torch.zeros(1, c, min(h, 3), min(w, 3), dtype=param.dtype, device=param.device)
            at_zero = self(zero)[:, rows].abs().max().item()
        return at_zero + x_bound * lip_inf


@torch.no_grad()
def converge_spectral_norms(module: nn.Module, iterations: int = 100) -> None:
    """Run power iteration to convergence on every spectral-normalised conv of `module` (after
    editing weights by hand, or before certifying a model whose u, v lag its weights)."""
    for conv in module.modules():
        if isinstance(conv, LipschitzConv2d) and conv.coeff is not None and conv.method == "power":
            steps, conv.power_iterations = conv.power_iterations, iterations
            conv._power_iteration(conv.weight.detach().flatten(1).to(conv.u.dtype))
            conv.power_iterations = steps
