"""The block interface and the numerics shared by all blocks.

A block is a bijection f on [B, C, H, W] tensors with

    forward(x)  -> (y, logdet)   logdet[b] = log|det ∂f/∂x (x[b])|
    inverse(y)  -> x
    lipschitz_bound() -> (L, L_inv)   certified from the current parameters: Lip(f) ≤ L and
                                      Lip(f⁻¹) ≤ L_inv, so every singular value of J_f lies in
                                      [1/L_inv, L] (docs/design.md §3.4)

Precision (docs/design.md §3.5 (6)): the flow's main path (x, y, log-dets, priors) stays in float32 (float64
when the input is float64) even under torch.autocast; only subnets run in the autocast dtype, and
their outputs are cast back before they touch the main path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import NamedTuple

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


_REUSE_SCOPE: ContextVar[object | None] = ContextVar("lipflow_reuse_scope", default=None)


@contextmanager
def reuse_weights(scope: object | None = None) -> Iterator[object]:
    """A scope in which parameters do not change, so that what is derived from them without
    autograd may be computed once and reused (NoGradCache); pass a scope back in to reopen it.
    Opened inside another scope, it is that scope: the parameters are fixed there already.

    Reuse is tied to scopes rather than to checks on the parameters: DeepSpeed ZeRO 1/2 writes
    updated weights into a flat buffer the parameters are views of, which leaves their version
    counters as they were, and a value check would cost a device sync per lookup. Scopes in use:
    one invertible run's forward and backward pass (flows/memory.py), one fixed-point solve
    (residual.py), the model's certificates (multiscale.py) and the training loop's sampler check;
    no optimizer step can fall inside any of them."""
    scope = (_REUSE_SCOPE.get() or object()) if scope is None else scope
    token = _REUSE_SCOPE.set(scope)
    try:
        yield scope
    finally:
        _REUSE_SCOPE.reset(token)


def in_reuse_scope() -> bool:
    return _REUSE_SCOPE.get() is not None


class NoGradCache:
    """Values derived from parameters (a 1×1 conv's W and W⁻¹, a normalised kernel, a
    certificate), computed once per `reuse_weights` scope when no autograd graph is being built:
    the invertible backward pass inverts with the weights its forward pass formed, a fixed-point
    solve calls the same subnet many times. Outside a scope, or with autograd, every call
    computes. Within a scope an in-place edit of a source still invalidates through its version
    counter."""

    def __init__(self):
        self._entries: dict[str, tuple] = {}

    def get(self, name: str, tensors: Sequence[torch.Tensor], compute: Callable[[], object]):
        if torch.is_grad_enabled():  # first: torch.compile traces through it without a break
            return compute()
        scope = _REUSE_SCOPE.get()
        if scope is None:
            return compute()
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        entry = self._entries.get(name)
        if entry is None or entry[0] is not scope or entry[1] != key:
            # the entry holds its scope and sources, so neither identity can be reused meanwhile
            entry = (scope, key, tuple(tensors), compute())
            self._entries[name] = entry
        return entry[3]


class Rerun(NamedTuple):
    """A block's input reconstructed from its output, and the block re-run on it with autograd
    (see FlowBlock.rerun): `x` the input (detached), `leaves` the tensors x's gradient is taken
    at, `join` maps their gradients to x's, `y` and `logdet` the re-run's outputs."""

    x: torch.Tensor
    leaves: list[torch.Tensor]
    join: Callable[..., torch.Tensor]
    y: torch.Tensor
    logdet: torch.Tensor


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

    # inverse(forward(x)) gives x back to rounding error, in one pass: the backward pass may then
    # reconstruct a block's input instead of storing it (memory="invertible", flows/memory.py)
    exact_inverse = True

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

    def rerun(self, y: torch.Tensor, input_grad: bool = True) -> Rerun:
        """The invertible backward pass's step (flows/memory.py): x = f⁻¹(y) without autograd,
        then (y, logdet) = f(x) with autograd, x a leaf (requiring grad if `input_grad`).
        Blocks that can share work between the two passes override it."""
        with torch.no_grad():
            x = self.inverse(y)
        x = x.detach().requires_grad_(input_grad)
        with torch.enable_grad():
            y, logdet = self(x)
        return Rerun(x.detach(), [x], lambda grad_x: grad_x, y, logdet)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """y = f(x) without the log-det (data init); blocks with a costly log-det override it."""
        return self.forward(x)[0]

    def lipschitz_bound(self) -> tuple[float, float]:
        raise NotImplementedError

    def channel_matrix(self) -> torch.Tensor | None:
        """For a per-position linear block, y[:, :, i, j] = M·x[:, :, i, j] + b, the c×c matrix M
        (float64, detached), so that runs of such blocks are certified as one matrix; else None."""
        return None

    def logdet_bound(self) -> tuple[float, float]:
        """Certified range of log|det J|: σ(J) ⊂ [1/L_inv, L] gives [-D·ln L_inv, D·ln L]."""
        lip, lip_inv = self.lipschitz_bound()
        return -self.dims * math.log(lip_inv), self.dims * math.log(lip)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"
