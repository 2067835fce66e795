"""Empirical Lipschitz estimates by power iteration on Jacobian products (docs/design.md §3.4).

For a map f acting independently on each sample of a batch, ‖J_f(x)‖₂ = σ_max(J_f(x)) ≤ Lip(f), and
power iteration on JᵀJ, v ← JᵀJv / ‖JᵀJv‖, approaches σ_max from below: for any unit v, ‖Jv‖ ≤
σ_max. The returned max_b ‖J(x_b) v_b‖ is therefore a certified *lower* bound on Lip(f), and a
certified upper bound from the parameters (``lipschitz_bound()``) must never fall below it.

The inverse: Lip(f⁻¹) ≥ σ_max(J_{f⁻¹}(y)) = 1/σ_min(J_f(x)) at y = f(x), so the same routine applied
to the inverse map at the latents estimates the contraction of f (``lipschitz_estimates``: both).

Inputs and outputs may be a tensor [B, ...] or a list/tuple of them (a multi-scale flow's latents);
the batch dimension comes first everywhere and samples must not interact (no batch statistics: eval
mode). J·v comes from forward-mode AD (torch.func.jvp) and Jᵀ·u from reverse mode (torch.func.vjp);
where an op lacks a forward-mode rule, method="auto" falls back to reverse mode twice:
J·v = ∂/∂u ⟨Jᵀu, v⟩.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

Tensors = torch.Tensor | Sequence[torch.Tensor]
Method = Literal["auto", "forward", "reverse"]


def tensor_leaves(x: Any) -> list[torch.Tensor]:
    """The tensors of a tensor or of a (nested) list/tuple of tensors, in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, list | tuple):
        return [t for item in x for t in tensor_leaves(item)]
    raise TypeError(f"expected a tensor or a list/tuple of tensors, got {type(x).__name__}")


def _per_sample_sq(leaves: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over all non-batch entries of all leaves of t², per sample, in float64 -> [B]."""
    return sum(t.detach().to(torch.float64).reshape(len(t), -1).square().sum(1) for t in leaves)


def _scale(leaves: Sequence[torch.Tensor], factor: torch.Tensor) -> list[torch.Tensor]:
    return [t * factor.to(t.dtype).view(-1, *([1] * (t.dim() - 1))) for t in leaves]


def _normalise(leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    norm = _per_sample_sq(leaves).sqrt()
    return _scale(leaves, 1.0 / norm.clamp_min(1e-300))


def _functional_operators(g: Callable, primals: tuple[torch.Tensor, ...]):
    """J·v by forward mode (torch.func.jvp), Jᵀ·u by reverse mode (torch.func.vjp)."""
    _, vjp_fn = torch.func.vjp(g, *primals)

    def jvp(v):
        return list(torch.func.jvp(g, primals, tuple(v))[1])

    def vjp(u):
        return list(vjp_fn(tuple(u)))

    with warnings.catch_warnings():
        # torch's forward-AD decompositions are compiled with torch.jit.script on first use,
        # which warns about its own deprecation; nothing here to act on
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        jvp([torch.zeros_like(p) for p in primals])  # fail here, not mid-iteration
    return jvp, vjp


def _operators(f: Callable, x: Tensors, method: Method):
    """Return (jvp, vjp) closures on lists of leaves, linearised at x."""
    single = isinstance(x, torch.Tensor)
    primals = tuple(t.detach() for t in tensor_leaves(x))

    def g(*leaves):
        out = f(leaves[0] if single else list(leaves))
        return tuple(tensor_leaves(out))

    if method in ("auto", "forward"):
        try:
            return _functional_operators(g, primals)
        except (NotImplementedError, RuntimeError):
            if method == "forward":
                raise
            # an op without a forward-mode rule (or a transform limitation): reverse mode twice

    xs = [p.clone().requires_grad_(True) for p in primals]
    with torch.enable_grad():
        ys = g(*xs)
        # u0 is a dummy cotangent: Jᵀu0 is linear in u0, and its derivative along v is J·v
        u0 = [torch.zeros_like(y, requires_grad=True) for y in ys]
        jt_u0 = torch.autograd.grad(ys, xs, u0, create_graph=True, allow_unused=True)
    live = [i for i, t in enumerate(jt_u0) if t is not None and t.requires_grad]

    def jvp_rev(v):
        if not live:
            return [torch.zeros_like(y) for y in ys]
        out = torch.autograd.grad(
            [jt_u0[i] for i in live], u0, [v[i] for i in live], retain_graph=True, allow_unused=True
        )
        return [torch.zeros_like(y) if t is None else t.detach() for y, t in zip(ys, out)]

    def vjp_rev(u):
        out = torch.autograd.grad(ys, xs, u, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if t is None else t.detach() for p, t in zip(xs, out)]

    return jvp_rev, vjp_rev


def spectral_norms(
    f: Callable, x: Tensors, iters: int = 10, *, seed: int = 0, method: Method = "auto"
) -> torch.Tensor:
    """Per-sample estimates [B] of σ_max(J_f(x_b)) after ``iters`` power-iteration steps on JᵀJ."""
    if iters < 1:
        raise ValueError("iters must be ≥ 1")
    jvp, vjp = _operators(f, x, method)
    g = torch.Generator().manual_seed(seed)
    v = _normalise(
        [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in tensor_leaves(x)]
    )
    for _ in range(iters - 1):
        v = _normalise(vjp(jvp(v)))
    return _per_sample_sq(jvp(v)).sqrt()


def lipschitz_estimate(
    f: Callable, x: Tensors, iters: int = 10, *, seed: int = 0, method: Method = "auto"
) -> float:
    """max over the batch of ‖J_f(x_b)‖₂ by power iteration: a lower bound on Lip(f)."""
    return float(spectral_norms(f, x, iters, seed=seed, method=method).max())


def lipschitz_estimates(
    forward: Callable,
    inverse: Callable,
    x: Tensors,
    iters: int = 10,
    *,
    seed: int = 0,
    method: Method = "auto",
) -> tuple[float, float]:
    """(estimate of Lip(f) at x, estimate of Lip(f⁻¹) at y = f(x)): lower bounds on (L, L_inv)."""
    with torch.no_grad():
        y = forward(x)
    y = [t.detach() for t in y] if isinstance(y, list | tuple) else y.detach()
    fwd = lipschitz_estimate(forward, x, iters, seed=seed, method=method)
    inv = lipschitz_estimate(inverse, y, iters, seed=seed, method=method)
    return fwd, inv
