"""`python -m pipeline model --config X [a.b=value ...]`: build the model and print its summary,
with its certified Lipschitz bounds per factor and composed (log10), and their tightness against
power-iteration estimates on a batch of synthetic faces (docs/design.md §3.4, §3.6).

The summary prints a level at a time as each is certified. Estimates take some 80 passes of their
batch through the model (power iteration on J and J⁻¹, per factor and for the whole map), and a
pass of 4 images at 256² takes a minute on a CPU core: by default they are computed only up to
ESTIMATE_RESOLUTION, and asked for above it."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from tqdm import tqdm

from pipeline import progress
from pipeline.config import add_config_arguments, config_from_args, describe_model
from pipeline.data.quantise import dequantise
from pipeline.flows.multiscale import MultiScaleFlow, build_flow
from pipeline.flows.summary import summary_lines

ESTIMATE_RESOLUTION = 64  # the largest image side estimated by default (the demo's is 32)
DEFAULT_ESTIMATE_IMAGES = 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument(
        "--estimate-images",
        type=int,
        default=None,
        help="synthetic faces to data-initialise on and to estimate Lipschitz constants at "
        "(power iteration on J and J^-1); 0: certified bounds only, model as built (default: "
        f"{DEFAULT_ESTIMATE_IMAGES} up to {ESTIMATE_RESOLUTION}x{ESTIMATE_RESOLUTION} images, "
        "0 above)",
    )
    p.add_argument("--power-iters", type=int, default=10, help="power-iteration steps")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    resolution = cfg.data.resolution
    n_images = args.estimate_images
    if n_images is None:
        n_images = DEFAULT_ESTIMATE_IMAGES if resolution <= ESTIMATE_RESOLUTION else 0
    try:
        with progress.stage(f"building the model ({describe_model(cfg)})"):
            flow = build_flow(cfg.model, (3, resolution, resolution), cfg.data.n_bits)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    estimates = None
    if n_images > 0:
        with progress.stage(f"data-initialising on {n_images} synthetic faces"):
            x = synthetic_batch(n_images, resolution, cfg.data.n_bits, cfg.data.seed)
            flow.data_init(x)
        with progress.stage("estimating Lipschitz constants by power iteration"):
            estimates = lipschitz_estimates(flow.eval(), x, args.power_iters)
    with progress.stage("certifying the bounds level by level"):
        for line in summary_lines(flow, estimates):
            print(line, flush=True)
    if args.estimate_images is None and n_images == 0:
        print(
            f"  (no estimates: above {ESTIMATE_RESOLUTION}x{ESTIMATE_RESOLUTION} images their "
            "~80 passes through the model take over an hour on a CPU; --estimate-images N "
            "computes them at N synthetic faces)"
        )
    return 0


def synthetic_batch(n: int, resolution: int, n_bits: int, seed: int) -> torch.Tensor:
    """n synthetic faces, n-bit quantised and uniformly dequantised into [-1/2, 1/2) (docs/design.md §3)."""
    from pipeline.data.synth import make_face

    k = np.stack([make_face(resolution, seed, i) for i in range(n)]) >> (8 - n_bits)
    u = np.random.default_rng(seed).random(k.shape)
    x = dequantise(k, n_bits, u)
    return torch.from_numpy(x.transpose(0, 3, 1, 2)).float()


def lipschitz_estimates(
    flow: MultiScaleFlow, x: torch.Tensor, iters: int
) -> dict[str, tuple[float, float]]:
    """{factor name: (estimate of Lip(f), of Lip(f⁻¹))} for every factor of the composed bound
    (`flow.factors()`), at the inputs that reach it from x, and "model" for the whole x -> z: lower
    bounds on the certified pairs, by power iteration on J and J⁻¹ (pipeline/theory/jacobian.py)."""
    from pipeline.theory.jacobian import lipschitz_estimates as estimate

    factors = flow.factors()
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        blocks[0].register_forward_pre_hook(
            lambda _, args, name=name: inputs.setdefault(name, args[0].detach())
        )
        for _, name, blocks in factors
    ]
    try:
        with torch.no_grad():
            flow.encode(x)
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for _, name, blocks in tqdm(factors, desc="factors", unit="factor", file=sys.stderr):

        def forward(h, blocks=blocks):
            for block in blocks:
                h = block(h)[0]
            return h

        def inverse(h, blocks=blocks):
            for block in reversed(blocks):
                h = block.inverse(h)
            return h

        out[name] = estimate(forward, inverse, inputs[name], iters)
    out["model"] = estimate(lambda t: flow.encode(t)[0], flow.decode, x, iters)
    return out
