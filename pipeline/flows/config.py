"""The model section of the config tree (owned by pipeline/flows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ModelConfig:
    levels: int = 2
    steps: int = 4  # flow steps per level
    width: int = 32  # hidden channels of coupling subnets
    coupling: Literal["additive", "affine", "affine_exp"] = "affine"
    conv: Literal["svd", "lu", "none"] = "svd"
    actnorm: Literal["bounded", "unbounded", "none"] = "bounded"
    log_scale_bound: float = 2.0  # |log-scale| bound of actnorm, affine coupling and 1x1-conv sigmas
    spectral_norm: bool = False  # spectral-normalise coupling subnets
