"""Coupling layers (Dinh et al. 2017, RealNVP; Kingma & Dhariwal 2018, Glow §3.3)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from pipeline.flows.base import FlowBlock, Rerun, block_triangular_norm, frozen, run_subnet
from pipeline.flows.lipschitz import ConvNet

CouplingKind = Literal["additive", "affine", "affine_box", "affine_exp"]


class Coupling(FlowBlock):
    """x = (x_a, x_b) split by channels;  y_a = x_a,  y_b = x_b·exp(s(x_a)) + t(x_a).

    - additive:   s = 0                         log|det J| = 0
    - affine:     s = α·tanh(h_s/α), |s| < α      log|det J| = Σ s  ∈ (-α·D_b, α·D_b)
    - affine_box: the affine map inside the box |x_b| ≤ β, slope 1 outside it:
                  y_b = x_b + (e^s - 1)·clamp(x_b, -β, β) + t,   log|det J| = Σ s·[|x_b| ≤ β]
    - affine_exp: s = h_s (RealNVP's exp scale, unbounded: the stability study's baseline)
    with (h_s, t) = NN(x_a). `flip` swaps the halves' roles (used when no 1×1 conv mixes channels).
    With a spectral-normalised NN (Lip ≤ `coeff`), `scale_coeff` gives the log-scale head its own
    budget: h_s = (scale_coeff/coeff)·NN_s, so Lip(h_s) ≤ scale_coeff while Lip(t) ≤ coeff.

    Certified bounds (docs/design.md §3.4), under the ASSUMPTION |x|_∞ ≤ β (`x_bound`) at the block's input:
    an affine coupling is not globally Lipschitz (x_b·e^{s(x_a)} grows without bound), the additive
    one needs no assumption. J = [[I, 0], [A, diag(e^s)]] with A = diag(x_b·e^s)·∂s + ∂t, and
    J⁻¹ = [[I, 0], [-(diag(x_b)·∂s + diag(e^-s)·∂t), diag(e^-s)]]. With a = Lip(t), b = Lip(h_s)
    (products of certified layer norms, ≤ subnet_coeff when spectral-normalised) and |s| ≤ s_max on
    the domain, s_max = α·tanh(m/α) (affine) or m (affine_exp), m = |h_s(0)|_∞ + β·Π‖conv‖_∞→∞:
        additive:  ‖J‖, ‖J⁻¹‖ ≤ σ_max([[1, 0], [a, 1]]) = (a + sqrt(a² + 4))/2 ≤ 1 + a
        affine:    ‖J‖ ≤ σ_max([[1, 0], [g·β·b + a, e^s_max]]),
                   ‖J⁻¹‖ ≤ σ_max([[1, 0], [β·b + e^s_max·a, e^s_max]])
    where g bounds the factor e^s·∂s/∂h_s of ∂(x_b·e^s)/∂x_a = diag(x_b·e^s·∂s/∂h_s)·∂h_s: for
    s = α·tanh(h_s/α) = α·τ it is e^{ατ}·(1 - τ²), whose maximum over |τ| ≤ τ_max = s_max/α lies at
    τ* = min((sqrt(1 + α²) - 1)/α, τ_max) (≈ e^α/3.5 for α = 2, where e^s_max alone would give e^α);
    for affine_exp, g = e^s_max.
    A zero-initialised coupling (h ≡ 0) thus starts with L = L_inv = 1. The log-det range needs no
    assumption: |log|det J|| < α·D_b (affine, affine_box), 0 (additive), none for affine_exp.

    affine_box needs NO assumption: its certificate holds on all of R^D. With φ(x_b) = x_b +
    (e^s - 1)·clamp(x_b, -β, β): ∂φ/∂x_b ∈ {e^s, 1} ⊂ [e^-α, e^α]; |∂φ/∂s| = e^s·|clamp(x_b)| ≤ e^s·β;
    inverse x_b = u - (e^s - 1)·clamp(u·e^-s, -β, β), u = y_b - t, with ∂x_b/∂u ∈ {e^-s, 1} and
    |∂x_b/∂s| = |x_b| ≤ β inside the box, e^s·β outside; so, with s_max = α (any x_a) and g as below,
        affine_box: ‖J‖ ≤ σ_max([[1, 0], [g·β·b + a, e^α]]),
                    ‖J⁻¹‖ ≤ σ_max([[1, 0], [g·β·b + e^α·a, e^α]])
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        kind: CouplingKind,
        width: int,
        log_scale_bound: float,
        x_bound: float,
        flip: bool = False,
        coeff: float | None = None,
        spectral_method: Literal["exact", "fourier"] = "exact",
        scale_coeff: float | None = None,
    ):
        super().__init__(shape)
        c = shape[0]
        if c < 2:
            raise ValueError(f"a coupling needs at least 2 channels, got shape {shape}")
        self.kind = kind
        self.flip = flip
        self.log_scale_bound = log_scale_bound
        self.x_bound = x_bound
        # h_s = κ·(the net's scale rows): a spectral-normalised net certifies Lip(h_s) ≤ scale_coeff
        self.scale_gain = 1.0 if coeff is None or scale_coeff is None else scale_coeff / coeff
        self.c_a = c - c // 2 if flip else c // 2
        self.c_b = c - self.c_a
        n_out = self.c_b if kind == "additive" else 2 * self.c_b
        self.net = ConvNet(
            self.c_a,
            n_out,
            width,
            coeff=coeff,
            method=spectral_method,
            spatial=shape[1:],
        )

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.flip:
            x_b, x_a = x[:, : self.c_b], x[:, self.c_b :]
        else:
            x_a, x_b = x[:, : self.c_a], x[:, self.c_a :]
        return x_a, x_b

    def _join(self, y_a: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
        return torch.cat([y_b, y_a] if self.flip else [y_a, y_b], dim=1)

    def _scale_shift(self, x_a: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        h = run_subnet(self.net, x_a)
        if self.kind == "additive":
            return None, h
        h_s, t = h[:, : self.c_b], h[:, self.c_b :]
        if self.scale_gain != 1.0:
            h_s = self.scale_gain * h_s
        if self.kind in ("affine", "affine_box"):
            alpha = self.log_scale_bound
            return alpha * torch.tanh(h_s / alpha), t
        return h_s, t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = self._halves(x)
        s, t = self._scale_shift(x_a)
        return self._couple(x_a, x_b, s, t)

    def _couple(
        self, x_a: torch.Tensor, x_b: torch.Tensor, s: torch.Tensor | None, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if s is None:
            return self._join(x_a, x_b + t), x_a.new_zeros(x_a.shape[0])
        if self.kind == "affine_box":
            beta = self.x_bound
            y_b = x_b + torch.expm1(s) * x_b.clamp(-beta, beta) + t
            inside = (x_b.abs() <= beta).to(s.dtype)
            return self._join(x_a, y_b), (s * inside).flatten(1).sum(1)
        y_b = x_b * torch.exp(s) + t
        return self._join(x_a, y_b), s.flatten(1).sum(1)

    def _uncouple(self, y_b: torch.Tensor, s: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
        if s is None:
            return y_b - t
        if self.kind == "affine_box":
            u = y_b - t
            return u - torch.expm1(s) * (u * torch.exp(-s)).clamp(-self.x_bound, self.x_bound)
        return (y_b - t) * torch.exp(-s)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = self._halves(y)
        with frozen(self):
            s, t = self._scale_shift(y_a)
        return self._join(y_a, self._uncouple(y_b, s, t))

    def rerun(self, y: torch.Tensor, input_grad: bool = True) -> Rerun:
        """One subnet evaluation serves both passes: x_a = y_a, so (s, t) = NN(y_a) with autograd
        gives x_b by the inverse and then y again, where the generic rerun evaluates NN twice."""
        y_a, y_b = self._halves(y)
        x_a = y_a.detach().requires_grad_(input_grad)
        with torch.enable_grad():
            s, t = self._scale_shift(x_a)
        with torch.no_grad():
            x_b = self._uncouple(y_b, s, t)
        x_b.requires_grad_(input_grad)
        with torch.enable_grad():
            y, logdet = self._couple(x_a, x_b, s, t)
        return Rerun(self._join(x_a, x_b).detach(), [x_a, x_b], self._join, y, logdet)

    def max_log_scale(self) -> float:
        """s_max: a certified bound on |s| for inputs with |x|_∞ ≤ x_bound (see the class doc)."""
        c_a, h, w = self.c_a, self.shape[1], self.shape[2]
        m = self.scale_gain * self.net.sup_bound((c_a, h, w), self.x_bound, slice(0, self.c_b))
        if self.kind == "affine":
            return self.log_scale_bound * math.tanh(m / self.log_scale_bound)
        return m

    def _scale_slope(self, s_max: float) -> float:
        """g = max e^s·∂s/∂h_s over |s| ≤ s_max (see the class docstring)."""
        if self.kind == "affine_exp":
            return math.exp(s_max)
        alpha = self.log_scale_bound
        tau = min((math.sqrt(1 + alpha * alpha) - 1) / alpha, s_max / alpha)
        return math.exp(alpha * tau) * (1 - tau * tau)

    def lipschitz_bound(self) -> tuple[float, float]:
        if self.kind == "additive":
            lip_t = self.net.lipschitz_bound()
            bound = block_triangular_norm(lip_t, 1.0)
            return bound, bound
        lip_s = self.scale_gain * self.net.lipschitz_bound(slice(0, self.c_b))
        lip_t = self.net.lipschitz_bound(slice(self.c_b, None))
        beta = self.x_bound
        if self.kind == "affine_box":
            e_s = math.exp(self.log_scale_bound)
            cross = self._scale_slope(self.log_scale_bound) * beta * lip_s
            return (
                block_triangular_norm(cross + lip_t, e_s),
                block_triangular_norm(cross + e_s * lip_t, e_s),
            )
        s_max = self.max_log_scale()
        if s_max > 700:  # e^s_max overflows: no finite certificate
            return math.inf, math.inf
        e_s = math.exp(s_max)
        forward = block_triangular_norm(self._scale_slope(s_max) * beta * lip_s + lip_t, e_s)
        inverse = block_triangular_norm(beta * lip_s + e_s * lip_t, e_s)
        return forward, inverse

    def logdet_bound(self) -> tuple[float, float]:
        # unconditional (no domain assumption), since the training guard holds every batch to it
        if self.kind == "additive":
            return 0.0, 0.0
        if self.kind == "affine_exp":
            return -math.inf, math.inf
        bound = self.log_scale_bound * self.c_b * self.shape[1] * self.shape[2]
        return -bound, bound

    def extra_repr(self) -> str:
        return f"shape={self.shape}, kind={self.kind}, flip={self.flip}"
