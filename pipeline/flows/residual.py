"""Invertible residual block (Behrmann et al. 2019, i-ResNet; Chen et al. 2019, Residual Flows)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from pipeline.flows.base import FlowBlock, frozen, reuse_weights, run_subnet
from pipeline.flows.lipschitz import ConvNet


class ResidualBlock(FlowBlock):
    """y = x + g(x) with g spectral-normalised so that Lip(g) ≤ c < 1.

    Bounds (i-ResNet Lemma 2): Lip(f) ≤ 1 + c, Lip(f⁻¹) ≤ 1/(1 - c), with c the certified Lip(g).

    log|det J_f| = log det(I + J_g) = Σ_{k≥1} (-1)^{k+1}/k · tr(J_g^k)     (i-ResNet Eq. 7)
    - "hutchinson": the series truncated after n = `terms` terms, each tr(J_g^k) ≈ vᵀJ_g^k v with
      one Rademacher v per sample and k vector-Jacobian products. Unbiased for the truncated series;
      the truncation error is at most D·c^{n+1}/((n+1)(1 - c)).
    - "exact": the full Jacobian (D vector-Jacobian products) and slogdet(I + J_g) in float64; for
      tiny inputs (tests, the theory engineer's checks).

    The inverse is the fixed point x = y - g(x) (Banach iteration, contraction c), iterated from
    x₀ = y until max|x_{k+1} - x_k| ≤ tol; then ‖x_k - x*‖ ≤ c/(1-c)·‖x_k - x_{k-1}‖. Diagnostics:
    `last_inverse_iterations`, `last_inverse_step`. Its derivatives are implicit (exact).
    """

    # the inverse is a fixed point to a tolerance and the log-det draws random probes: memory
    # "invertible" checkpoints residual steps instead of reconstructing their inputs
    exact_inverse = False

    def __init__(
        self,
        shape: tuple[int, int, int],
        width: int,
        coeff: float = 0.9,
        terms: int = 8,
        logdet: Literal["hutchinson", "exact"] = "hutchinson",
        tol: float = 1e-6,
        max_iter: int = 200,
        spectral_method: Literal["exact", "fourier"] = "exact",
    ):
        super().__init__(shape)
        if not 0.0 < coeff < 1.0:
            raise ValueError(f"residual_coeff must lie in (0, 1) for invertibility, got {coeff}")
        c = shape[0]
        self.coeff = coeff
        self.terms = terms
        self.logdet_mode = logdet
        self.tol = tol
        self.max_iter = max_iter
        self.g = ConvNet(
            c,
            c,
            width,
            coeff=coeff,
            activation="lipswish",
            zero_init=False,
            method=spectral_method,
            spatial=shape[1:],
        )
        self.last_inverse_iterations = 0
        self.last_inverse_step = 0.0

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return x + run_subnet(self.g, x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outer_grad = torch.is_grad_enabled()
        with torch.enable_grad():
            x_in = x if x.requires_grad else x.detach().requires_grad_(True)
            gx = run_subnet(self.g, x_in)
            # the log-det must be differentiable only when the caller is building a graph
            create_graph = outer_grad
            if self.logdet_mode == "exact":
                logdet = self._exact_logdet(x_in, gx, create_graph)
            else:
                logdet = self._series_logdet(x_in, gx, create_graph)
        y = x_in + gx
        if not outer_grad:
            y, logdet = y.detach(), logdet.detach()
        return y, logdet

    def _series_logdet(self, x: torch.Tensor, gx: torch.Tensor, create_graph: bool) -> torch.Tensor:
        v = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
        w = v
        logdet = x.new_zeros(x.shape[0])
        for k in range(1, self.terms + 1):
            (w,) = torch.autograd.grad(gx, x, w, create_graph=create_graph, retain_graph=True)
            w = w.to(x.dtype)
            logdet = logdet + (-1) ** (k + 1) / k * (w * v).flatten(1).sum(1)
        return logdet

    def _exact_logdet(self, x: torch.Tensor, gx: torch.Tensor, create_graph: bool) -> torch.Tensor:
        b, d = x.shape[0], self.dims
        flat = gx.reshape(b, d)
        rows = []
        for i in range(d):
            # samples do not interact, so one backward pass gives row i of every sample's Jacobian
            (row,) = torch.autograd.grad(
                flat[:, i].sum(), x, create_graph=create_graph, retain_graph=True
            )
            rows.append(row.reshape(b, d))
        jac = torch.stack(rows, dim=1).to(torch.float64)
        eye = torch.eye(d, dtype=torch.float64, device=x.device)
        return torch.linalg.slogdet(eye + jac).logabsdet.to(x.dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        params = tuple(self.g.parameters())
        if torch.is_grad_enabled() and (y.requires_grad or any(p.requires_grad for p in params)):
            return _FixedPointInverse.apply(y, self, *params)
        return self.solve(y)

    @torch.no_grad()
    def solve(self, y: torch.Tensor) -> torch.Tensor:
        """x with x + g(x) = y by Banach iteration x ← y - g(x) (no autograd)."""
        with frozen(self), reuse_weights():  # one normalised kernel for all iterations
            x = y
            step = math.inf
            iterations = 0
            while iterations < self.max_iter:
                x_next = y - run_subnet(self.g, x)
                step = (x_next - x).abs().max().item()
                x = x_next
                iterations += 1
                if step <= self.tol:
                    break
        self.last_inverse_iterations = iterations
        self.last_inverse_step = step
        return x

    def lip_g(self) -> float:
        return self.g.lipschitz_bound()

    def lipschitz_bound(self) -> tuple[float, float]:
        lip_g = self.lip_g()
        return 1.0 + lip_g, (1.0 / (1.0 - lip_g) if lip_g < 1.0 else math.inf)

    def logdet_bound(self) -> tuple[float, float]:
        """[D·ln(1 - c), D·ln(1 + c)] for the exact log-det. The Hutchinson estimate obeys its own
        deterministic bound, |v^T J_g^k v| ≤ |v|²·c^k = D·c^k for Rademacher v, so it lies in
        ±D·Σ_{k≤n} c^k/k; the union is returned, so a guard never flags estimator noise."""
        lip_g = self.lip_g()
        if lip_g >= 1.0:
            return -math.inf, math.inf
        lo, hi = self.dims * math.log1p(-lip_g), self.dims * math.log1p(lip_g)
        if self.logdet_mode == "hutchinson":
            series = sum(lip_g**k / k for k in range(1, self.terms + 1))
            lo, hi = min(lo, -self.dims * series), max(hi, self.dims * series)
        return lo, hi

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, coeff={self.coeff}, terms={self.terms}, "
            f"logdet={self.logdet_mode}, tol={self.tol}"
        )


class _FixedPointInverse(torch.autograd.Function):
    """x = f⁻¹(y) with implicit derivatives: from x + g(x) = y, (I + J_g)·dx = dy - (∂g/∂θ)·dθ, so
    for an upstream gradient ḡ the cotangent u = (I + J_g)⁻ᵀ ḡ solves the fixed point
    u = ḡ - J_gᵀu (a contraction, since Lip(g) < 1), and ∂L/∂y = u, ∂L/∂θ = -(∂g/∂θ)ᵀu (as for
    deep equilibrium models). The backward is itself differentiable, so Jacobian-vector products of
    the inverse work by reverse mode twice (the Lipschitz estimates of the sampler)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, block: ResidualBlock, *params: torch.Tensor) -> torch.Tensor:
        x = block.solve(y.detach())
        ctx.block = block
        ctx.save_for_backward(x, *params)
        return x

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        x, *params = ctx.saved_tensors
        block = ctx.block
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad(), frozen(block):
            x = x.detach().requires_grad_(True)
            gx = run_subnet(block.g, x)
            u = grad_x
            scale = max(grad_x.detach().abs().max().item(), 1e-30)
            for _ in range(block.max_iter):
                (jt_u,) = torch.autograd.grad(
                    gx, x, u, retain_graph=True, create_graph=create_graph
                )
                u_next = grad_x - jt_u
                step = (u_next - u).detach().abs().max().item()
                u = u_next
                if step <= block.tol * scale:
                    break
            trainable = [p for p in params if p.requires_grad]
            grads = (
                torch.autograd.grad(gx, trainable, -u, create_graph=create_graph, allow_unused=True)
                if trainable
                else ()
            )
        by_param = dict(zip(map(id, trainable), grads, strict=True))
        return (u, None, *(by_param.get(id(p)) for p in params))
