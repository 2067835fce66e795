"""A readable model summary: parameters, levels and shapes, block types, certified bounds."""

from __future__ import annotations

import math
from collections import Counter

from pipeline.flows.multiscale import MultiScaleFlow


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4g}"


def summary(flow: MultiScaleFlow) -> str:
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
    lines = [
        f"MultiScaleFlow: image {c}x{h}x{w} (D = {flow.dims}), {flow.n_bits}-bit, "
        f"{cfg.levels} levels x {cfg.steps} steps, block={cfg.block}, width={cfg.width}",
        f"  parameters: {n_params:,}",
        f"  step: actnorm={cfg.actnorm} conv={cfg.conv} {last} "
        f"log_scale_bound={cfg.log_scale_bound}",
        "  levels:",
    ]
    bounds = flow.block_bounds()
    z_index = 0
    for index, level in enumerate(flow.levels):
        shape = "x".join(map(str, flow.level_shapes[index]))
        kinds = Counter(type(block).__name__ for block in level.steps)
        params = sum(p.numel() for p in level.parameters())
        lip = lip_inv = 1.0
        for _, _, block_lip, block_lip_inv in (b for b in bounds if b[0] == index):
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
        lines.append(
            f"    level {index}: {shape}  blocks {blocks}  params {params:,}  "
            f"L={_fmt(lip)} L_inv={_fmt(lip_inv)}  {out}"
        )
    lip, lip_inv = flow.lipschitz_bound(bounds)
    lo, hi = flow.logdet_bound()
    cond = lip * lip_inv
    bits = flow.dims * math.log(2)
    lines += [
        f"  certified bounds: Lip(f) <= {_fmt(lip)}, Lip(f^-1) <= {_fmt(lip_inv)}, "
        f"cond(J) <= {_fmt(cond)}",
        f"  certified log|det J| in [{_fmt(lo)}, {_fmt(hi)}] nats "
        f"= [{_fmt(lo / bits)}, {_fmt(hi / bits)}] bits/dim",
    ]
    if cfg.block == "glow" and cfg.coupling in ("affine", "affine_exp"):
        lines.append(
            f"  (affine-coupling bounds assume |x|_inf <= {cfg.affine_x_bound} at its inputs)"
        )
    return "\n".join(lines)
