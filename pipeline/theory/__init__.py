"""Theory: linear-flow likelihood optimum, Lipschitz estimates, log-det balance, divergence events.

Imports torch, the standard library and the n-bit rule (pipeline/data/quantise.py) only
(docs/design.md §2); each module's docstring has the maths.
"""

from pipeline.theory.closed_form import Optimum, optimal_nll, optimum_from_correlation
from pipeline.theory.config import GuardConfig
from pipeline.theory.detector import DivergenceDetector, Event
from pipeline.theory.diagnostics import (
    certified_logdet_range,
    flow_diagnostics,
    grad_norms,
    inverse_error,
    level_group,
    logdet_balance,
)
from pipeline.theory.gaussian import gaussian_images, gaussian_optimum, random_covariance
from pipeline.theory.jacobian import lipschitz_estimate, lipschitz_estimates, spectral_norms

__all__ = [
    "DivergenceDetector",
    "Event",
    "GuardConfig",
    "Optimum",
    "certified_logdet_range",
    "flow_diagnostics",
    "gaussian_images",
    "gaussian_optimum",
    "grad_norms",
    "inverse_error",
    "level_group",
    "lipschitz_estimate",
    "lipschitz_estimates",
    "logdet_balance",
    "optimal_nll",
    "optimum_from_correlation",
    "random_covariance",
    "spectral_norms",
]
