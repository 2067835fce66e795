"""The block interface and the numerics shared by all blocks.

A block is a bijection f on [B, C, H, W] tensors with

    forward(x)  -> (y, logdet)   logdet[b] = log|det ∂f/∂x (x[b])|
    inverse(y)  -> x
    lipschitz_bound() -> (L, L_inv)   certified from the current parameters: Lip(f) ≤ L and
                                      Lip(f⁻¹) ≤ L_inv, so every singular value of J_f lies in
                                      [1/L_inv, L] (DESIGN §3.4)

Precision (DESIGN §3.5 (6)): the flow's main path (x, y, log-dets, priors) stays in float32 (float64
when the input is float64) even under torch.autocast; only subnets run in the autocast dtype, and
their outputs are cast back before they touch the main path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn


def main_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of the flow's main path: float64 stays float64, everything else becomes float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def full_precision(x: torch.Tensor) -> AbstractContextManager:
    """Disable autocast for main-path ops that autocast would lower (conv, matmul)."""
    return torch.autocast(x.device.type, enabled=False)


def compute_dtype(p: torch.Tensor) -> torch.dtype:
    """Dtype in which main-path weights are formed from a parameter: at least float32, so that bf16
    parameter storage (DeepSpeed's bf16 mode) still gives fp32 weights, scales and log-dets."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def run_subnet(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A subnet runs under whatever autocast is active; its output returns in x's (main-path) dtype.

    Without autocast the input is cast to the subnet's parameter dtype (bf16 parameters under
    DeepSpeed's bf16 mode, float64 in tests)."""
    if not torch.is_autocast_enabled(x.device.type):
        return net(x.to(next(net.parameters()).dtype)).to(x.dtype)
    return net(x).to(x.dtype)


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration: spectral-norm power iterations must not move the weights while an
    inverse iterates or data init propagates (the map must stay the one that was trained/saved)."""
    modes = [(m, m.training) for m in module.modules()]
    module.train(False)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def block_triangular_norm(a: float, d: float) -> float:
    """σ_max of [[1, 0], [a, d]]: a bound on ‖[[I, 0], [A, D]]‖₂ given ‖A‖₂ ≤ a and ‖D‖₂ ≤ d.

    The spectral norm of a block matrix is at most that of the matrix of its blocks' norms.
    """
    if math.isinf(a) or math.isinf(d):
        return math.inf
    m = max(1.0, a, d)  # scale to avoid overflow of the squares for huge bounds
    one, a, d = 1.0 / m, a / m, d / m
    trace = one * one + a * a + d * d
    det = one * d
    return m * math.sqrt((trace + math.sqrt(max(trace * trace - 4.0 * det * det, 0.0))) / 2.0)


class FlowBlock(nn.Module):
    """Base class: a bijection on tensors of shape [B, *shape] (see the module docstring)."""

    def __init__(self, shape: tuple[int, int, int]):
        super().__init__()
        self.shape = tuple(shape)

    @property
    def dims(self) -> int:
        c, h, w = self.shape
        return c * h * w

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """y = f(x) without the log-det (data init); blocks with a costly log-det override it."""
        return self.forward(x)[0]

    def lipschitz_bound(self) -> tuple[float, float]:
        raise NotImplementedError

    def logdet_bound(self) -> tuple[float, float]:
        """Certified range of log|det J|: σ(J) ⊂ [1/L_inv, L] gives [-D·ln L_inv, D·ln L]."""
        lip, lip_inv = self.lipschitz_bound()
        return -self.dims * math.log(lip_inv), self.dims * math.log(lip)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"
