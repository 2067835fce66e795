"""The model section of the config tree (owned by pipeline/flows).

Each level squeezes by a factor 2, runs `steps` flow steps, then (except the last) factors half of
the channels out under a learned conditional prior. A step is

    glow:      [actnorm] → [1×1 conv] → coupling                   (Kingma & Dhariwal 2018)
    residual:  [actnorm] → [1×1 conv] → x + g(x), Lip(g) < 1   (Behrmann 2019; Chen 2019)

where [..] is dropped by `actnorm: none` / `conv: none`. Presets, their keys in ``PRESETS``
(``model.preset=NAME`` sets them, keys given beside it win: pipeline/config.py):

- certified (the default): boxed affine coupling (s = α·tanh(h_s/α) inside |x_b| ≤ β, slope 1
  outside, so its bound needs no assumption on the input) with a subnet spectral-normalised by
  the certified norm of each conv's symbol (flows/spectral.py: exact on the torus of small feature
  maps, a fixed grid with a proven 2% margin on larger ones; Lip(t) ≤ subnet_coeff, Lip(h_s) ≤
  scale_coeff), LU 1×1 conv (exact bounds from its SVD), bounded actnorm, a bounded split
  prior (|log σ| ≤ prior_log_std_bound: the sampler, which no block bound covers). Every block,
  and so the model, has finite certified bounds for the map and its inverse; each actnorm → 1×1
  conv pair is certified as one matrix (MultiScaleFlow.bound_factors);
- bounded (the previous default, kept as a stability baseline): its coupling bounds assume
  |x|_∞ ≤ 8 at coupling inputs, which trained models can exceed, and are loose;
- glow (unconstrained Glow, the stability baseline);
- linear (a linear flow: closed-form optimum, docs/design.md §3.2);
- residual (i-ResNet / Residual Flow; the coupling key is then unused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pipeline.ranges import NON_NEGATIVE, OPEN_UNIT, POSITIVE, Range, at_least

PRESETS: dict[str, dict[str, Any]] = {
    "certified": {},  # the defaults below
    # the unconstrained blocks; spectral_norm and the split prior's bound pinned off, as the
    # certified default turns them on
    "glow": {
        "coupling": "affine_exp",
        "conv": "lu",
        "actnorm": "unbounded",
        "spectral_norm": False,
        "prior_log_std_bound": 0.0,
    },
    # the previous defaults, every key that shaped a glow step's blocks or
    # their certified range (which the guard's log-det check reads): tanh-bounded affine coupling
    # with plain subnets, SVD 1x1 conv, bounded actnorm, all with |log-scale| <= 2 (the coupling's
    # alpha has its own key since)
    "bounded": {
        "coupling": "affine",
        "conv": "svd",
        "actnorm": "bounded",
        "spectral_norm": False,
        "subnet_coeff": 1.0,
        "spectral_method": "exact",
        "log_scale_bound": 2.0,
        "coupling_log_scale_bound": 2.0,
        "affine_x_bound": 8.0,
        "prior_log_std_bound": 0.0,  # the unbounded split prior it was trained with
    },
    "linear": {"coupling": "none", "levels": 1, "split_prior": "standard"},
    "residual": {"block": "residual"},
}


@dataclass
class ModelConfig:
    levels: int = 2
    steps: int = 4  # flow steps per level
    width: int = 32  # hidden channels of coupling subnets and residual g
    block: Literal["glow", "residual"] = "glow"
    # additive: y_b = x_b + t(x_a); affine: y_b = x_b·exp(α·tanh(h/α)) + t; affine_box: the same
    # inside |x_b| ≤ affine_x_bound, slope 1 outside (a bound without assumptions); affine_exp:
    # exp(h), unbounded; none: no coupling, so a step is actnorm + 1×1 conv and the flow is linear
    coupling: Literal["additive", "affine", "affine_box", "affine_exp", "none"] = "affine_box"
    # svd: singular values bounded by e^±α by construction; lu: Glow's, free, certified exactly
    conv: Literal["svd", "lu", "none"] = "lu"
    actnorm: Literal["bounded", "unbounded", "none"] = "bounded"
    # α: the |log-scale| bound of actnorm and of the SVD 1x1 conv's singular values
    log_scale_bound: float = 2.0
    spectral_norm: bool = True  # spectral-normalise coupling subnets to Lip ≤ subnet_coeff
    subnet_coeff: float = 4.0  # certified Lip of a whole spectral-normalised coupling subnet
    # certified Lip of the affine coupling's log-scale head h_s (its own budget: it is multiplied
    # by |x_b| ≤ affine_x_bound in the bound); with spectral_norm only
    scale_coeff: float = 4.0
    # α of the affine coupling's s = α·tanh(h_s/α); its e^α multiplies into the composed bound
    coupling_log_scale_bound: float = 1.0
    # β. affine: Lipschitz only on a bounded domain, its certified (L, L_inv) assume |x|_∞ ≤ β at
    # its input; affine_box: the box of its affine part (its bound holds everywhere)
    affine_x_bound: float = 4.0
    residual_coeff: float = 0.9  # c: certified Lip(g) ≤ c < 1, so L ≤ 1 + c and L_inv ≤ 1/(1 - c)
    residual_terms: int = 8  # terms of the log-det power series
    # exact: the full Jacobian and slogdet, for tiny inputs (tests, theory checks)
    residual_logdet: Literal["hutchinson", "exact"] = "hutchinson"
    residual_tol: float = 1e-6  # fixed-point inverse: stop when max |x_k+1 - x_k| ≤ tol
    residual_max_iter: int = 200
    # exact: sqrt(k·k)·‖W_mat‖₂, certified at every training forward, so Lip ≤ c by construction;
    # fourier: the norm of each 3×3 conv's symbol (flows/spectral.py: its torus, or a fixed 32×32
    # grid with a proven margin of ≤ 2% on σ), so a layer may use (nearly) its whole budget (exact
    # leaves a 3×3 layer between c/3 and c); a cost per step that does not grow with the image
    spectral_method: Literal["exact", "fourier"] = "fourier"
    split_prior: Literal["learned", "standard"] = "learned"  # standard: N(0, I) for factored-out z
    # α of the learned prior's log σ = α·tanh(h/α) (flows/multiscale.Split); 0 = unbounded (what
    # a checkpoint saved without this key was trained with: pipeline.config.ADDED)
    prior_log_std_bound: float = 8.0
    # activations for the backward pass (pipeline/flows/memory.py): store them all; checkpoint
    # each flow step (recompute it); invertible: keep only each level's output and reconstruct
    # step inputs with the exact inverse (memory independent of depth; residual steps checkpoint)
    memory: Literal["store", "checkpoint", "invertible"] = "store"

    RANGES: ClassVar[dict[str, Range]] = {
        "levels": at_least(1),
        "steps": NON_NEGATIVE,
        "width": at_least(1),
        "log_scale_bound": POSITIVE,
        "subnet_coeff": POSITIVE,
        "scale_coeff": POSITIVE,
        "coupling_log_scale_bound": POSITIVE,
        "affine_x_bound": POSITIVE,
        "prior_log_std_bound": NON_NEGATIVE,
        "residual_coeff": OPEN_UNIT,
        "residual_terms": at_least(1),
        "residual_tol": POSITIVE,
        "residual_max_iter": at_least(1),
    }
