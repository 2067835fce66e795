"""Training diagnostics cheap enough for every N steps (docs/design.md §3.3-3.5, metric names from §6).

- ``logdet_balance``: log-det per dimension per level (or block), with the expansion total (sum of
  the positive parts) and the contraction total (sum of the negative parts). MLE rewards expansion
  (§3.3); a healthy flow spreads volume change across levels instead of concentrating it (§3.5 (4)).
- ``certified_logdet_range``: -ln L_inv ≤ log|det J|/D ≤ ln L for a certified pair (L, L_inv), §3.4.
- ``inverse_error``: max |f⁻¹(f(x)) - x|, the sampler's health (§3.3).
- ``grad_norms``: global and per-group gradient norms from .grad, squares summed in float32 and
  accumulated in float64 (DeepSpeed reports no norm at ZeRO stage 0).
- ``flow_diagnostics``: all of the above plus Lipschitz estimates, for a pipeline.flows model.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from pipeline.theory.jacobian import Method, Tensors, lipschitz_estimate, tensor_leaves


def logdet_balance(
    logdet_parts: torch.Tensor | Mapping[str, torch.Tensor | float],
    num_dims: int,
    *,
    prefix: str = "level",
) -> dict[str, float]:
    """Per-part log|det J| per dimension (nats, batch mean) and the expansion/contraction totals.

    ``logdet_parts``: [K, B] (part k named f"{prefix}{k}", e.g. a flow's ``logdet_levels``) or a
    mapping name -> [B] or scalar (e.g. per block). ``num_dims`` = D of one sample, so the parts sum
    to the flow's log|det J|/D. Returns {name: value, "expansion": Σ max(v, 0),
    "contraction": Σ min(v, 0) (≤ 0), "total": Σ v, "concentration": max|v| / Σ|v| (1 = all volume
    change in one part; 0 when there is none)}.
    """
    if isinstance(logdet_parts, Mapping):
        items = list(logdet_parts.items())
    else:
        parts = torch.as_tensor(logdet_parts)
        if parts.dim() == 1:
            parts = parts[:, None]
        items = [(f"{prefix}{k}", parts[k]) for k in range(parts.shape[0])]
    out: dict[str, float] = {}
    for name, value in items:
        out[name] = float(torch.as_tensor(value).detach().to(torch.float64).mean()) / num_dims
    values = list(out.values())
    magnitude = sum(abs(v) for v in values)
    out["expansion"] = sum(max(v, 0.0) for v in values)
    out["contraction"] = sum(min(v, 0.0) for v in values)
    out["total"] = sum(values)
    out["concentration"] = max(abs(v) for v in values) / magnitude if magnitude > 0 else 0.0
    return out


def certified_logdet_range(lipschitz: float, inverse_lipschitz: float) -> tuple[float, float]:
    """(-ln L_inv, ln L): all singular values of J lie in [1/L_inv, L], so log|det J|/D does too."""
    lo = -math.log(inverse_lipschitz) if inverse_lipschitz > 0 else -math.inf
    hi = math.log(lipschitz) if lipschitz > 0 else -math.inf
    return lo, hi


@torch.no_grad()
def inverse_error(encode: Callable, decode: Callable, x: Tensors) -> float:
    """max |decode(encode(x)) - x| over all entries (inf/nan if the reconstruction is not finite).

    ``encode`` must return exactly what ``decode`` takes, e.g. ``lambda x: flow.encode(x)[0]``.
    """
    x_rec = decode(encode(x))
    worst = 0.0
    for a, b in zip(tensor_leaves(x_rec), tensor_leaves(x), strict=True):
        err = (a.to(torch.float64) - b.to(torch.float64)).abs()
        if not bool(torch.isfinite(err).all()):
            return math.nan if bool(torch.isnan(err).any()) else math.inf
        worst = max(worst, float(err.max()) if err.numel() else 0.0)
    return worst


LEVEL_PATTERN = re.compile(r"(?:^|\.)levels?\.(\d+)(?:\.|$)")


def level_group(name: str) -> str | None:
    """'levels.1.steps.0.conv.weight' -> 'level1'; None for parameters outside a level."""
    match = LEVEL_PATTERN.search(name)
    return f"level{match.group(1)}" if match else None


def grad_norms(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    group_fn: Callable[[str], str | None] | None = level_group,
    *,
    reducer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    grad_fn: Callable[[str, torch.nn.Parameter], torch.Tensor | None] | None = None,
) -> dict[str, float]:
    """{"global": ‖g‖₂, "<group>": ‖g_group‖₂, ...} from the gradients, computed in float32/64.

    Each gradient is cast to float32 before squaring (bf16 squares would lose the small entries) and
    the per-tensor sums are accumulated in float64. Groups come from ``group_fn(name)`` over *all*
    parameters (gradient or not), so every rank produces the same groups in the same order.

    Distributed use: with ZeRO 0/1 the gradients in .grad are already all-reduced and identical on
    every rank: pass no reducer. With ZeRO 2 each rank holds only a partition of the gradients: pass
    ``grad_fn`` returning this rank's local fragment (None if it owns none) and ``reducer``, a SUM
    all-reduce of the float64 vector of squared norms that returns the reduced vector, e.g.
    ``lambda t: (dist.all_reduce(t), t)[1]``; every rank must call this function. (DeepSpeed's
    ``safe_get_full_grad`` as grad_fn also works at stage 1/2, with no reducer, at the cost of one
    all-reduce per parameter.) Non-finite gradients propagate into the norms (inf/nan), which is
    what the divergence detector looks for.
    """
    grad_fn = grad_fn or (lambda _name, p: p.grad)
    members: list[tuple[str | None, torch.Tensor | None]] = []
    for name, p in named_parameters:
        members.append((group_fn(name) if group_fn is not None else None, grad_fn(name, p)))
    names = sorted({group for group, _ in members if group is not None})
    index = {g: i + 1 for i, g in enumerate(names)}
    sq = torch.zeros(len(names) + 1, dtype=torch.float64)
    for group, grad in members:
        if grad is None or grad.numel() == 0:
            continue
        s = grad.detach().to(torch.float32).square().sum().to(torch.float64).cpu()
        sq[0] += s
        if group is not None:
            sq[index[group]] += s
    if reducer is not None:
        sq = reducer(sq)
    norms = sq.sqrt()
    out = {"global": float(norms[0])}
    out.update({g: float(norms[index[g]]) for g in names})
    return out


def flow_diagnostics(
    flow: Any,
    x: torch.Tensor,
    *,
    power_iters: int = 10,
    seed: int = 0,
    method: Method = "auto",
) -> dict[str, float]:
    """Every diagnostic of one batch for a pipeline.flows model, keyed by docs/design.md §6 metric names.

    Uses ``flow(x)`` (a dict with ``logdet`` [B] and ``logdet_levels`` [L, B]; given per_block=True
    also ``logdet_blocks`` [K, B] named by ``flow.blocks()``), ``flow.encode(x) -> (zs, logdet)``,
    ``flow.decode(zs)``, ``flow.lipschitz_bound() -> (L, L_inv)`` and, if present,
    ``flow.logdet_bound() -> (lo, hi)`` per image (tighter than ±D·ln L). The flow is in eval mode
    for the duration (no batch statistics, no spectral-norm updates) and restored. Cost: one
    forward, one encode/decode and ``power_iters`` jvp+vjp pairs each way: use a few images. The
    certified bounds must never fall below the estimates (docs/design.md §3.4).

    Keys: balance/level{i}/logdet, balance/{expansion,contraction,concentration} over levels;
    balance/<block name>/logdet and balance/blocks/{expansion,contraction,concentration} when the
    flow reports blocks; lipschitz/{forward,inverse}_{bound,est}; stability/inverse_error; and the
    probe's own diagnostics/logdet_{lower,upper} (certified range, per dim, narrowed by the
    Lipschitz bounds) and diagnostics/logdet_{min,max}_per_dim (the probe's extremes). The training
    loop produces lipschitz/logdet_{lower,upper} and stability/logdet_{min,max}_per_dim from the
    whole batch every step; these names keep the probe from overwriting them.
    """
    was_training = flow.training
    flow.eval()
    try:
        num_dims = x[0].numel()
        per_block = _accepts(flow.forward, "per_block") and hasattr(flow, "blocks")
        with torch.no_grad():
            out = flow(x, per_block=True) if per_block else flow(x)
            zs, _ = flow.encode(x)
        zs = [z.detach() for z in zs] if isinstance(zs, list | tuple) else zs.detach()
        lip, lip_inv = flow.lipschitz_bound()

        def encode(t):
            return flow.encode(t)[0]

        metrics = {}
        for key, value in logdet_balance(out["logdet_levels"], num_dims).items():
            metrics[f"balance/{key}/logdet" if key.startswith("level") else f"balance/{key}"] = (
                value
            )
        if per_block:
            names = [name for _, name, _ in flow.blocks()]
            parts = dict(zip(names, out["logdet_blocks"], strict=True))
            for key, value in logdet_balance(parts, num_dims).items():
                metrics[f"balance/{key}/logdet" if key in parts else f"balance/blocks/{key}"] = (
                    value
                )
        lo, hi = certified_logdet_range(lip, lip_inv)
        if hasattr(flow, "logdet_bound"):
            block_lo, block_hi = flow.logdet_bound()
            lo, hi = max(lo, block_lo / num_dims), min(hi, block_hi / num_dims)
        logdet_per_dim = out["logdet"].detach().to(torch.float64) / num_dims
        metrics.update(
            {
                "lipschitz/forward_bound": float(lip),
                "lipschitz/inverse_bound": float(lip_inv),
                "diagnostics/logdet_lower": float(lo),
                "diagnostics/logdet_upper": float(hi),
                "lipschitz/forward_est": lipschitz_estimate(
                    encode, x, power_iters, seed=seed, method=method
                ),
                "lipschitz/inverse_est": lipschitz_estimate(
                    flow.decode, zs, power_iters, seed=seed, method=method
                ),
                "stability/inverse_error": inverse_error(encode, flow.decode, x),
                "diagnostics/logdet_min_per_dim": float(logdet_per_dim.min()),
                "diagnostics/logdet_max_per_dim": float(logdet_per_dim.max()),
            }
        )
        return metrics
    finally:
        flow.train(was_training)


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
