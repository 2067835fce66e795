"""Multi-scale normalizing flows of blocks with certified bi-Lipschitz bounds, in plain torch.

flow = build_flow(cfg.model, (3, r, r), cfg.data.n_bits)
flow.data_init(x)                      # explicit ActNorm init, identical on every rank
loss = flow(x)["bpd"].mean()           # also log_prob, logpz, logdet, logdet_levels
images = flow.sample(16, temperature=0.7)
L, L_inv = flow.lipschitz_bound()

ModelConfig.memory picks how the backward pass gets its activations: store, checkpoint, or
invertible (step inputs reconstructed by the exact inverse; pipeline/flows/memory.py).
"""

from pipeline.flows.actnorm import ActNorm
from pipeline.flows.base import FlowBlock
from pipeline.flows.config import ModelConfig
from pipeline.flows.conv1x1 import InvConv1x1LU, InvConv1x1SVD
from pipeline.flows.coupling import Coupling
from pipeline.flows.lipschitz import converge_spectral_norms
from pipeline.flows.multiscale import MultiScaleFlow, Split, build_flow, squeeze, unsqueeze
from pipeline.flows.residual import ResidualBlock
from pipeline.flows.summary import summary

__all__ = [
    "ActNorm",
    "Coupling",
    "FlowBlock",
    "InvConv1x1LU",
    "InvConv1x1SVD",
    "ModelConfig",
    "MultiScaleFlow",
    "ResidualBlock",
    "Split",
    "build_flow",
    "converge_spectral_norms",
    "squeeze",
    "summary",
    "unsqueeze",
]
