"""ActNorm (Kingma & Dhariwal 2018, Glow §3.1): bounded log-scale, explicit data init."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.flows.base import FlowBlock, compute_dtype


class ActNorm(FlowBlock):
    """Per-channel affine map  y = x·exp(ℓ) + b,  log|det J| = H·W·Σ_c ℓ_c.

    Bounded (α given): ℓ = α·tanh(θ/α) ∈ (-α, α), so Lip = max_c e^{ℓ_c} ≤ e^α and Lip⁻¹ = max_c
    e^{-ℓ_c} (exact). Unbounded (α None): ℓ = θ, Glow's parameterisation.

    The data-dependent init is the named step `initialize(x)` (never a side effect of forward): it
    sets ℓ, b so that y has zero mean and unit variance per channel over the batch, as far as the
    bound allows; it depends only on x, so every rank given the same x gets identical parameters,
    and calling it again with the same x changes nothing. `initialized` is a buffer (checkpointed).
    """

    def __init__(self, shape: tuple[int, int, int], log_scale_bound: float | None):
        super().__init__(shape)
        c = shape[0]
        self.log_scale_bound = log_scale_bound
        self.theta = nn.Parameter(torch.zeros(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("initialized", torch.tensor(False))

    def log_scale(self) -> torch.Tensor:
        alpha = self.log_scale_bound
        theta = self.theta.to(compute_dtype(self.theta))
        return theta if alpha is None else alpha * torch.tanh(theta / alpha)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        x64 = x.to(torch.float64)
        mean = x64.mean(dim=(0, 2, 3))
        std = x64.std(dim=(0, 2, 3), unbiased=False)
        log_scale = -torch.log(std.clamp_min(1e-6))
        alpha = self.log_scale_bound
        if alpha is None:
            theta = log_scale
        else:
            # a target outside (-α, α) is clamped: the bound wins over unit variance
            ratio = (log_scale / alpha).clamp(-1 + 1e-6, 1 - 1e-6)
            theta = alpha * torch.atanh(ratio)
        self.theta.copy_(theta)
        self.bias.copy_(-mean * torch.exp(self.log_scale().to(torch.float64)))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale = self.log_scale().to(x.dtype)
        y = x * torch.exp(log_scale).view(1, -1, 1, 1) + self.bias.to(x.dtype).view(1, -1, 1, 1)
        h, w = x.shape[2:]
        logdet = (h * w * log_scale.sum()).expand(x.shape[0])
        return y, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        log_scale = self.log_scale().to(y.dtype)
        return (y - self.bias.to(y.dtype).view(1, -1, 1, 1)) * torch.exp(-log_scale).view(
            1, -1, 1, 1
        )

    def lipschitz_bound(self) -> tuple[float, float]:
        log_scale = self.log_scale().detach()
        return math.exp(log_scale.max().item()), math.exp(-log_scale.min().item())

    def channel_matrix(self) -> torch.Tensor:
        return torch.diag(torch.exp(self.log_scale().detach().double()))

    def logdet_bound(self) -> tuple[float, float]:
        # the log-det of a linear map is a constant: its bound is its value
        h, w = self.shape[1:]
        value = h * w * self.log_scale().detach().double().sum().item()
        return value, value
