"""The certificate's cost per weight update at a config's architecture:
`python -m pipeline bench certificate [options]`.

The normalisers' work (flows/lipschitz.py group_top + group_scales, then the backward pass of the
scales) over every spectral group of every level, as one training step pays it once per weight
update, independent of the batch: the model is built at --resolution (its levels' H×W decide each
fourier group's torus or grid, so the published resolution gives the published frequencies) but
never run on images. Weights: the model's init, with the zero-initialised last convs of the
subnets drawn as nn.Conv2d draws (a trained layer is nonzero: a zero kernel certifies at once).
Warm-start vectors: warmed up once (untimed), then advanced every round as training does.

Prints JSON: the groups (level, normaliser, kernel shape, convs, frequencies F, Gram side m), the
seconds per update (median of --rounds, wall and CPU, no profiler), the same split by the
normalisers' record_function stages (grams, power, certify, scales; a torch.profiler run), by
group, and the top ops by self CPU time. Before/after a change: the same command on two commits.

    python -m pipeline bench certificate                          # celebahq-256 at 256², 2 threads
    python -m pipeline bench certificate --resolution 64 --rounds 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from pipeline.bench.common import ROOT, emit, machine

STAGES = ("grams", "power", "certify", "scales")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(ROOT / "configs" / "celebahq-256.yaml"))
    p.add_argument("--resolution", type=int, help="image side (default: the config's)")
    p.add_argument("--rounds", type=int, default=3, help="timed updates (median)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--top-ops", type=int, default=15, help="ops listed by self CPU time")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled round")


def build(args: argparse.Namespace):
    from pipeline.config import load_config
    from pipeline.flows import build_flow
    from pipeline.flows.lipschitz import LipschitzConv2d

    cfg = load_config(args.config)
    resolution = args.resolution or cfg.data.resolution
    torch.manual_seed(0)
    model = build_flow(cfg.model, (3, resolution, resolution), cfg.data.n_bits)
    model.train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for conv in model.modules():
            if isinstance(conv, LipschitzConv2d) and not conv.weight.any():
                bound = 1 / math.sqrt(conv.weight[0].numel())  # nn.Conv2d's default draw
                conv.weight.uniform_(-bound, bound, generator=generator)
    return model, cfg, resolution


def describe(level: int, convs: list) -> dict:
    conv, normaliser = convs[0], convs[0].normaliser
    row = {
        "level": level,
        "normaliser": normaliser.name,
        "kernel": list(conv.weight.shape),
        "convs": len(convs),
        "spatial": list(conv.spatial) if conv.spatial else None,
        "m": normaliser.state_shape[1],
    }
    if hasattr(normaliser, "freq"):
        row.update(frequencies=normaliser.freq.count, route=normaliser.freq.route)
    return row


def update(groups: list[tuple[int, list]], by_group: list[float] | None = None) -> None:
    """One weight update's certificate: every group's top (advancing the vectors) and scales, then
    the backward pass of the scales. `by_group`: add each group's forward seconds."""
    from pipeline.flows.lipschitz import group_scales, group_top

    scales = []
    for i, (_, convs) in enumerate(groups):
        start = time.perf_counter()
        scales.append(group_scales(convs, group_top(convs, update=True)))
        if by_group is not None:
            by_group[i] += time.perf_counter() - start
    torch.autograd.backward(torch.cat(scales).sum())


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    model, cfg, resolution = build(args)
    groups = [(i, g) for i, level in enumerate(model.levels) for g in level.spectral_groups]
    start = time.perf_counter()
    update(groups)  # warm-up: cold vectors take the exact eigenvectors, once
    warmup = time.perf_counter() - start
    walls, cpus, by_group = [], [], [0.0] * len(groups)
    for _ in range(max(args.rounds, 1)):
        model.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter(), time.process_time()
        update(groups, by_group)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    out = {
        "config": args.config,
        "model": {"levels": cfg.model.levels, "steps": cfg.model.steps, "width": cfg.model.width},
        "resolution": resolution,
        "machine": machine(args.threads),
        "rounds": args.rounds,
        "warmup_s": round(warmup, 3),
        "seconds_per_update": {
            "wall_median": round(statistics.median(walls), 3),
            "wall_all": [round(t, 3) for t in walls],
            "cpu_median": round(statistics.median(cpus), 3),
        },
        "groups": [
            {**describe(level, convs), "forward_s": round(t / len(walls), 3)}
            for (level, convs), t in zip(groups, by_group, strict=True)
        ],
    }
    if not args.no_profile:
        out.update(profiled(groups, model, args.top_ops))
    emit(out)
    return 0


def profiled(groups: list[tuple[int, list]], model: torch.nn.Module, top_ops: int) -> dict:
    """One update under torch.profiler, a profiler per group (forward) and one for the backward
    pass: CPU seconds by the normalisers' record_function stages, per group and in all, and the
    top ops by self CPU time (the profiler's bookkeeping inflates all of these a little)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from pipeline.flows.lipschitz import group_scales, group_top

    model.zero_grad(set_to_none=True)
    ops: dict[str, list[float]] = {}
    total = {k: 0.0 for k in (*STAGES, "backward")}
    per_group, scales = [], []

    def count(prof) -> dict[str, float]:
        stages = {}
        for e in prof.key_averages():
            if e.key.startswith("spectral_norm/"):
                stages[e.key.removeprefix("spectral_norm/")] = e.cpu_time_total / 1e6
            else:
                entry = ops.setdefault(e.key, [0.0, 0])
                entry[0] += e.self_cpu_time_total / 1e6
                entry[1] += e.count
        return stages

    for _, convs in groups:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            scales.append(group_scales(convs, group_top(convs, update=True)))
        stages = count(prof)
        per_group.append({k: round(stages.get(k, 0.0), 3) for k in STAGES})
        for k in STAGES:
            total[k] += stages.get(k, 0.0)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.autograd.backward(torch.cat(scales).sum())
    count(prof)
    total["backward"] = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
    all_self = sum(v[0] for v in ops.values())
    return {
        "profiled_stage_cpu_s": {k: round(v, 3) for k, v in total.items()},
        "profiled_stage_cpu_s_by_group": per_group,
        "top_ops": [
            {
                "op": k,
                "self_cpu_s": round(v[0], 3),
                "share": round(v[0] / all_self, 3),
                "calls": v[1],
            }
            for k, v in sorted(ops.items(), key=lambda kv: kv[1][0], reverse=True)[:top_ops]
        ],
    }
