"""A readable model summary: parameters, levels and shapes, block types, certified bounds per factor
and composed, and (given estimates) their tightness, log10(certified / estimated) (docs/design.md §3.6)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

from pipeline.flows.base import reuse_weights
from pipeline.flows.lipschitz import FourierNormaliser
from pipeline.flows.multiscale import MultiScaleFlow


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4g}"


def _log10(value: float) -> str:
    if value <= 0:
        return "-inf"
    return "inf" if math.isinf(value) or math.isnan(value) else f"{math.log10(value):7.2f}"


def bound_lines(
    flow: MultiScaleFlow,
    estimates: dict[str, tuple[float, float]] | None = None,
    bounds: list[tuple[int, str, float, float]] | None = None,
) -> list[str]:
    """One line per factor of the composed bound and one for the model: certified log10 L and
    log10 L_inv and, for names in `estimates` ({name: (est L, est L_inv)}, "model" for the whole
    map), the estimates' log10 and the tightness log10(certified / estimated). `bounds`: the
    model's `bound_factors()`, if already computed."""
    bounds = flow.bound_factors() if bounds is None else bounds
    rows = [(name, lip, lip_inv) for _, name, lip, lip_inv in bounds]
    rows.append(("model (composed)", *flow.lipschitz_bound(bounds)))
    width = max(len(name) for name, _, _ in rows)
    head = f"    {'factor':<{width}}  {'L':>7} {'L_inv':>7}"
    if estimates:
        head += f"   {'est L':>7} {'est Linv':>8}   {'tight L':>7} {'tight Linv':>10}"
    lines = [
        "  certified Lipschitz bounds, log10"
        + (
            " (est: power iteration at data points; tight = log10(certified/est))"
            if estimates
            else ""
        ),
        head,
    ]
    for name, lip, lip_inv in rows:
        line = f"    {name:<{width}}  {_log10(lip)} {_log10(lip_inv)}"
        est = (estimates or {}).get("model" if name == "model (composed)" else name)
        if est is not None:
            tight = [
                _log10(bound / value) if value > 0 else "inf"
                for bound, value in ((lip, est[0]), (lip_inv, est[1]))
            ]
            line += f"   {_log10(est[0])} {_log10(est[1]):>8}   {tight[0]} {tight[1]:>10}"
        lines.append(line)
    return lines


def normaliser_lines(flow: MultiScaleFlow) -> list[str]:
    """How each level's spectral-normalised convs are normalised (flows/lipschitz.py): a k×k
    kernel's symbol on the torus of its H×W (exact) or on the fixed grid (its certified inflation
    on σ), 1×1 and "exact" convs by sqrt(k_h·k_w)·‖W_mat‖₂; one batch per group."""
    lines = []
    for index, level in enumerate(flow.levels):
        parts = []
        for convs in level.spectral_groups:
            normaliser, (c_out, c_in, k_h, k_w) = convs[0].normaliser, convs[0].weight.shape
            where = f"{c_in}->{c_out} {k_h}x{k_w} x{len(convs)}"
            if isinstance(normaliser, FourierNormaliser):
                freq = normaliser.freq
                how = f"symbol on {freq.route} {freq.n_h}x{freq.n_w}"
                if freq.route == "grid":
                    how += f" (sigma x{math.sqrt(freq.inflation):.4f})"
            else:
                how = "sqrt(k*k)*||W_mat||" if (k_h, k_w) != (1, 1) else "||W||"
            parts.append(f"{where}: {how}")
        if parts:
            lines.append(f"    level {index}: " + "; ".join(parts))
    return (
        ["  certified normalisation (batched per level and conv position):", *lines]
        if lines
        else []
    )


def summary(flow: MultiScaleFlow, estimates: dict[str, tuple[float, float]] | None = None) -> str:
    """The model's summary; `estimates` as in `bound_lines` adds the tightness columns."""
    return "\n".join(summary_lines(flow, estimates))


def summary_lines(
    flow: MultiScaleFlow, estimates: dict[str, tuple[float, float]] | None = None
) -> Iterator[str]:
    """The summary a line at a time, each level certified when its line is due: printed as they
    come, they show progress where certifying takes minutes (a trained 1024² model on a CPU).
    The bounds are computed once (`bound_factors`, a level at a time) for every line using them."""
    cfg = flow.cfg
    n_params = sum(p.numel() for p in flow.parameters())
    c, h, w = flow.image_shape
    if cfg.block == "residual":
        last = (
            f"residual(c={cfg.residual_coeff}, terms={cfg.residual_terms}, "
            f"logdet={cfg.residual_logdet}, spectral={cfg.spectral_method})"
        )
    else:
        last = f"coupling={cfg.coupling} spectral_norm={cfg.spectral_norm}"
        if cfg.spectral_norm:
            last += (
                f"({cfg.spectral_method}, subnet_coeff={cfg.subnet_coeff}, "
                f"scale_coeff={cfg.scale_coeff})"
            )
        if cfg.coupling in ("affine", "affine_box"):
            last += f" coupling_log_scale_bound={cfg.coupling_log_scale_bound}"
            last += f" affine_x_bound={cfg.affine_x_bound}"
    yield from [
        f"MultiScaleFlow: image {c}x{h}x{w} (D = {flow.dims}), {flow.n_bits}-bit, "
        f"{cfg.levels} levels x {cfg.steps} steps, block={cfg.block}, width={cfg.width}",
        f"  parameters: {n_params:,}",
        f"  step: actnorm={cfg.actnorm} conv={cfg.conv} {last} "
        f"log_scale_bound={cfg.log_scale_bound}",
        *normaliser_lines(flow),
        "  levels:",
    ]
    factors, bounds = flow.factors(), []
    scope = object()  # reopened for each certificate below: the convs certify once
    z_index = 0
    for index, level in enumerate(flow.levels):
        shape = "x".join(map(str, flow.level_shapes[index]))
        kinds = Counter(type(block).__name__ for block in level.steps)
        params = sum(p.numel() for p in level.parameters())
        with reuse_weights(scope):
            level_bounds = flow.bound_factors([f for f in factors if f[0] == index])
        bounds += level_bounds
        lip = lip_inv = 1.0
        for _, _, block_lip, block_lip_inv in level_bounds:
            lip, lip_inv = lip * block_lip, lip_inv * block_lip_inv
        if level.split is not None:
            z = "x".join(map(str, flow.z_shapes[z_index]))
            z_index += 1
            out = (
                f"split -> z {z} ({'learned' if level.split.prior is not None else 'N(0,I)'} prior)"
            )
        else:
            out = f"z_top {'x'.join(map(str, flow.z_shapes[-1]))} (N(0,I))"
        blocks = ", ".join(f"{n}x{k}" for k, n in kinds.items()) or "none"
        yield (
            f"    level {index}: {shape}  blocks {blocks}  params {params:,}  "
            f"L={_fmt(lip)} L_inv={_fmt(lip_inv)}  {out}"
        )
    lip, lip_inv = flow.lipschitz_bound(bounds)
    with reuse_weights(scope):
        lo, hi = flow.logdet_bound()
    cond = lip * lip_inv
    bits = flow.dims * math.log(2)
    yield from [
        f"  certified bounds: Lip(f) <= {_fmt(lip)}, Lip(f^-1) <= {_fmt(lip_inv)}, "
        f"cond(J) <= {_fmt(cond)}",
        f"  certified log|det J| in [{_fmt(lo)}, {_fmt(hi)}] nats "
        f"= [{_fmt(lo / bits)}, {_fmt(hi / bits)}] bits/dim",
    ]
    if cfg.block == "glow" and cfg.coupling in ("affine", "affine_exp"):
        yield f"  (affine-coupling bounds assume |x|_inf <= {cfg.affine_x_bound} at its inputs)"
    yield from bound_lines(flow, estimates, bounds)
