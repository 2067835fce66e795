"""`python -m pipeline study cost --config X`: training FLOPs per image, and the GPU-hours they imply.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the config's real model (its
levels, steps, width and blocks) running forward and backward of the bpd loss on CPU. Counting at the
config's resolution is out of reach on a CPU for 256² and 1024² (minutes to hours, tens of GB), so
the model is built at a probe resolution r with the same levels, and:

    F(batch)  = batch · per_image(r) + per_pass       (per_pass: the 1x1-conv weights, built once
                                                        per forward from their parameters)
    per_image(r) = F(2) - F(1),    per_pass = F(1) - per_image(r)
    per_image(R) = per_image(r) · (R/r)²              (every counted op is a convolution or a
                                                        matmul over positions: linear in H·W)

``--check-scaling`` counts per_image at r and 2r as well and reports the ratio (4 when the scaling
holds). Then, for ``steps`` optimiser steps on ``gpus`` GPUs, each running ``micro_batch`` images x
``grad_accum`` per step:

    FLOPs = steps · (global_batch · per_image(R) + gpus · grad_accum · per_pass)
    GPU-hours = FLOPs / (peak · MFU) / 3600

with an *assumed* model-FLOPs utilisation (MFU) of the GPU's dense bf16 peak: an estimate, not a
measurement; validation, diagnostics and checkpoints are left out. FlopCounterMode has no formula for
``torch.linalg.matrix_exp`` (it counts 0), so the SVD 1x1 convs' exponentials are missing from
per_pass (docs/studies.md gives a rough count).
"""

from __future__ import annotations

import argparse
import json
import time

from pipeline.config import add_config_arguments, config_from_args
from pipeline.study.runner import shipped

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense (the 1979 in the datasheet is with 2:4 sparsity)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--probe-resolution",
        type=int,
        help="resolution the FLOPs are counted at (default: the smallest the levels allow, ≥ 32)",
    )
    p.add_argument("--gpus", type=int, default=8, help="GPUs training one run (default 8)")
    p.add_argument("--steps", type=int, help="optimiser steps (default: the config's train.steps)")
    p.add_argument(
        "--mfu",
        type=float,
        nargs="+",
        default=[0.2, 0.4],
        help="assumed fractions of the peak actually sustained (default 0.2 0.4)",
    )
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    p.add_argument("--check-scaling", action="store_true", help="also count at twice the probe")
    add_config_arguments(p)  # e.g. --config configs/celebahq-256.yaml


def run(args: argparse.Namespace) -> int:
    if args.config:
        args.config = shipped(args.config)
    cfg = config_from_args(args)
    import torch

    torch.manual_seed(0)
    levels = cfg.model.levels
    probe = args.probe_resolution or max(32, 2**levels)
    start = time.perf_counter()
    counted = per_image_flops(cfg, probe)
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "resolution": cfg.data.resolution,
        "probe_resolution": probe,
        "parameters": counted["parameters"],
        **scale(counted, probe, cfg.data.resolution),
    }
    if args.check_scaling:
        twice = per_image_flops(cfg, 2 * probe)
        result["scaling_check"] = {
            "probe_x2": 2 * probe,
            "train_ratio": twice["train"] / counted["train"],
            "expected": 4.0,
        }
    result["count_seconds"] = time.perf_counter() - start
    steps = args.steps or cfg.train.steps
    result["estimates"] = [
        estimate(result, cfg, args.gpus, steps, args.peak_tflops, mfu) for mfu in args.mfu
    ]
    print(json.dumps(result, indent=1))
    return 0


def count_flops(model, x) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) of the mean bpd of batch ``x``."""
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        forward = counter.get_total_flops()
        out["bpd"].mean().backward()
        total = counter.get_total_flops()
    return forward, total


def per_image_flops(cfg, resolution: int) -> dict:
    """per-image and per-pass FLOPs (forward and forward+backward) of cfg's model at ``resolution``."""
    import torch

    from pipeline.flows import build_flow

    model = build_flow(cfg.model, (3, resolution, resolution), cfg.data.n_bits)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, resolution, resolution, generator=g) - 0.5
    model.data_init(x)  # ActNorm as in training; FLOPs do not depend on the values
    f1, t1 = count_flops(model, x[:1])
    f2, t2 = count_flops(model, x)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward": f2 - f1,
        "train": t2 - t1,
        "forward_per_pass": f1 - (f2 - f1),
        "train_per_pass": t1 - (t2 - t1),
    }


def scale(counted: dict, probe: int, resolution: int) -> dict:
    factor = (resolution / probe) ** 2
    return {
        "forward_flops_per_image": counted["forward"] * factor,
        "train_flops_per_image": counted["train"] * factor,
        "train_flops_per_pass": counted["train_per_pass"],
    }


def estimate(result: dict, cfg, gpus: int, steps: int, peak_tflops: float, mfu: float) -> dict:
    """GPU-hours and wall-clock hours of ``steps`` steps on ``gpus`` GPUs at an assumed MFU."""
    t = cfg.train
    global_batch = t.global_batch or t.micro_batch * t.grad_accum * gpus
    per_step = (
        global_batch * result["train_flops_per_image"]
        + gpus * t.grad_accum * result["train_flops_per_pass"]
    )
    gpu_hours = steps * per_step / (peak_tflops * 1e12 * mfu) / 3600
    return {
        "gpus": gpus,
        "steps": steps,
        "global_batch": global_batch,
        "images": steps * global_batch,
        "flops": steps * per_step,
        "assumed_mfu": mfu,
        "peak_tflops": peak_tflops,
        "gpu_hours": gpu_hours,
        "wall_hours": gpu_hours / gpus,
    }
