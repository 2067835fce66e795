"""Training-step throughput and memory per memory mode: `python -m pipeline bench train [options]`.

One training step is forward, backward and an AdamW step of the flow (plain torch, no DeepSpeed:
`bench scaling` measures the engine). For each memory mode (store, checkpoint, invertible;
pipeline/flows/memory.py) the step is measured
  - against resolution (--resolutions, at the base config's depth), and
  - against depth (--depths flow steps per level, at --depth-resolution),
each configuration in a fresh subprocess (so that its peak memory is its own), reporting
  images_per_s      batch / best step time of --repeats timed steps, after a warm-up step
  step_cpu_s        the best step's CPU time (process time: what other load on a shared machine
                    inflates least)
  peak_bytes        CPU: peak RSS minus RSS before the first step; CUDA: peak allocated minus
                    allocated before the first step (activations, gradients, AdamW state)
  saved_bytes       bytes autograd keeps for the backward pass (saved-tensor hooks, exact;
                    parameters excluded)
  model_flops       FLOPs of a store-mode step (torch.utils.flop_counter): the useful work
  executed_flops    the same count in the measured mode (recomputation and inverses included)
  matmul_fraction   model_flops / best step time / the measured matmul FLOP/s (fp32, or bf16
                    with --precision bf16; n = 2048 on CPU, 8192 on CUDA)
The machine is shared: the best of several steps counts, and the load average is reported.

The model is the base config's (--config, default configs/demo.yaml).
--precision bf16 runs the step under torch.autocast(bfloat16) with fp32 parameters. --max-batch
finds the largest batch that fits, by doubling then bisection, each try in a fresh process (CUDA:
until out of memory; any device: until peak_bytes exceeds --memory-limit-gb). --profile prints the
top ops of one step of the base model at --profile-batch under torch.profiler, in this process.

    python -m pipeline bench train                                   # the CPU grid
    python -m pipeline bench train --profile                         # where a step's time goes
    python -m pipeline bench train --device cuda --precision bf16 --config configs/celebahq-256.yaml \
        --resolutions 256 --depths '' --batch 4 --max-batch          # a GPU's largest batch
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from pipeline.bench.common import (
    emit,
    machine,
    matmul_rate,
    max_rss_bytes,
    rss_bytes,
    run_json,
    sync,
)
from pipeline.config import load_config
from pipeline.data.quantise import dequantise
from pipeline.flows import build_flow
from pipeline.io import atomic_write_text

MODES = ("store", "checkpoint", "invertible")


def csv_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/demo.yaml", help="model section and n_bits")
    p.add_argument("--resolutions", type=csv_ints, default=[32, 64, 128, 256])
    p.add_argument("--depths", type=csv_ints, default=[2, 4, 8, 16], help="steps per level")
    p.add_argument("--depth-resolution", type=int, default=64)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--levels", type=int, help="override the config's model.levels")
    p.add_argument("--width", type=int, help="override the config's model.width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed steps; the best counts")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the matmul rate too)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--max-batch", action="store_true", help="largest batch per resolution/mode")
    p.add_argument("--max-batch-cap", type=int, default=1024)
    p.add_argument("--memory-limit-gb", type=float, help="--max-batch: peak_bytes must stay below")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-batch", type=int, default=32)
    p.add_argument("--profile-steps", type=int, default=10, help="timed steps before profiling")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # JSON spec of one measurement
    p.add_argument("--json-out", help=argparse.SUPPRESS)  # the worker's result (run_json)


# ----- one configuration, in its own process ---------------------------------------------------
def build(spec: dict):
    """(flow, batch of dequantised images, AdamW) for a spec."""
    cfg = load_config(spec["config"], [])
    model = dataclasses.replace(cfg.model, **spec["model"])
    torch.manual_seed(0)
    r = spec["resolution"]
    flow = build_flow(model, (3, r, r), cfg.data.n_bits).to(spec["device"])
    if spec["mode"] != "store":  # (lets --profile run on code without memory modes)
        flow.memory = spec["mode"]
    n = cfg.data.n_bits
    k = torch.randint(0, 2**n, (spec["batch"], 3, r, r), generator=torch.Generator().manual_seed(1))
    x = dequantise(k, n, torch.rand(k.shape, generator=torch.Generator().manual_seed(2)))
    x = x.to(spec["device"])
    flow.data_init(x[:16])
    return flow, x, torch.optim.AdamW(flow.parameters(), lr=1e-5)


def step_fn(flow, x: torch.Tensor, optimizer, spec: dict):
    precision = spec.get("precision", "fp32")
    device = torch.device(spec["device"]).type

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = flow(x)
        out["bpd"].float().mean().backward()
        optimizer.step()

    return step


def measure(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    cuda = device.startswith("cuda")
    flow, x, optimizer = build(spec)
    step = step_fn(flow, x, optimizer, spec)
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times, cpu_times = [], []
    oom = getattr(torch.cuda, "OutOfMemoryError", MemoryError)
    try:
        for _ in range(1 + spec["repeats"]):
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            sync(device)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    except oom:
        return {**spec, "fits": False}
    peak = (torch.cuda.max_memory_allocated() if cuda else max_rss_bytes()) - base
    best = min(times[1:])
    result = {
        **spec,
        "fits": True,
        "step_s": round(best, 5),
        "step_s_median": round(statistics.median(times[1:]), 5),
        "step_cpu_s": round(min(cpu_times[1:]), 5),
        "images_per_s": round(spec["batch"] / best, 3),
        "peak_bytes": int(peak),
        "peak_bytes_per_image": int(peak / spec["batch"]),
        "params": sum(p.numel() for p in flow.parameters()),
    }
    if spec.get("count", True):  # extra passes, after the peak was read
        result.update(count(flow, x, step, spec))
        result["achieved_flop_s"] = result["model_flops"] / best
    return result


@contextlib.contextmanager
def saved_tensor_bytes(exclude: Sequence[torch.Tensor] = ()) -> Iterator[dict[str, int]]:
    """Count the bytes autograd keeps for the backward pass of what runs inside the block:
    {"bytes": Σ distinct storages saved, "tensors": saves}; storages of `exclude` (parameters)
    are left out. Exact and deterministic, unlike process memory. Tensors kept alive by other
    means than autograd's saved tensors (a checkpoint's inputs, live Python references) are not
    seen."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}
    out = {"bytes": 0, "tensors": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        out["tensors"] += 1
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"] = sum(storages.values())


def count(flow, x: torch.Tensor, step, spec: dict) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    params = [*flow.parameters(), *flow.buffers()]
    device = torch.device(spec["device"]).type
    with (
        torch.autocast(device, dtype=torch.bfloat16, enabled=spec.get("precision") == "bf16"),
        saved_tensor_bytes(params) as saved,
    ):
        out = flow(x)
    del out  # frees the graph
    flops = {}
    mode = flow.memory
    for name, memory in (("executed_flops", mode), ("model_flops", "store")):
        flow.memory = memory
        counter = FlopCounterMode(display=False)
        # its per-module attribution hooks break autograd.grad inside a backward pass (the
        # invertible mode's re-runs); only the total is needed
        counter.mod_tracker = GlobalOnly()
        with counter:
            step()
        flops[name] = counter.get_total_flops()
    flow.memory = mode
    return {"saved_bytes": saved["bytes"], **flops}


class GlobalOnly(contextlib.nullcontext):
    """Stands in for FlopCounterMode's module tracker: every FLOP counts towards "Global"."""

    parents = ("Global",)


# ----- the grid, max batch and profile ---------------------------------------------------------
def spec_for(args, resolution: int, mode: str, batch: int, steps: int | None = None) -> dict:
    model = {}
    if args.levels is not None:
        model["levels"] = args.levels
    if args.width is not None:
        model["width"] = args.width
    if steps is not None:
        model["steps"] = steps
    return {
        "config": str(Path(args.config).resolve()),
        "model": model,
        "resolution": resolution,
        "mode": mode,
        "batch": batch,
        "repeats": args.repeats,
        "threads": args.threads,
        "device": args.device,
        "precision": args.precision,
    }


def run_spec(spec: dict) -> dict:
    return run_json(
        [sys.executable, "-m", "pipeline", "bench", "train", "--worker", json.dumps(spec)]
    )


def with_fraction(result: dict, rate: float) -> dict:
    if "achieved_flop_s" in result:
        result["matmul_fraction"] = round(result["achieved_flop_s"] / rate, 4)
        # the same against CPU time: what the step achieves while it has a core to itself
        cpu_rate = result["model_flops"] / result["step_cpu_s"]
        result["matmul_fraction_cpu_time"] = round(cpu_rate / rate, 4)
    return result


def largest_batch(args, resolution: int, mode: str) -> dict:
    """Doubling until a batch does not fit, then bisection between the last fit and that."""
    limit = None if args.memory_limit_gb is None else args.memory_limit_gb * 2**30

    peaks: dict[int, int] = {}

    def fits(batch: int) -> dict | None:
        spec = {**spec_for(args, resolution, mode, batch), "repeats": 1, "count": False}
        result = run_spec(spec)
        ok = result.get("fits", False) and (limit is None or result["peak_bytes"] <= limit)
        if ok:
            peaks[batch] = result["peak_bytes"]
        return result if ok else None

    good, bad, batch = None, None, 1
    while batch <= args.max_batch_cap:
        result = fits(batch)
        if result is None:
            bad = batch
            break
        good, batch = result, batch * 2
    lo = good["batch"] if good else 0
    hi = bad if bad is not None else lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        result = fits(mid)
        if result is None:
            hi = mid
        else:
            good, lo = result, mid
    return {
        "resolution": resolution,
        "mode": mode,
        "max_batch": lo,
        "capped": bad is None,
        # the slope of peak memory over batch: what one more image costs, without the fixed
        # share (weights, gradients, optimizer state) that peak_bytes_per_image includes
        "marginal_bytes_per_image": slope(peaks),
        "at_max": good,
    }


def slope(points: dict[int, int]) -> int | None:
    """Least-squares slope of y over x."""
    if len(points) < 2:
        return None
    xs, ys = list(points), list(points.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return int(sum((x - mx) * (y - my) for x, y in points.items()) / sum((x - mx) ** 2 for x in xs))


def profile(args) -> dict:
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [])
    resolution = args.resolutions[0] if args.resolutions else cfg.data.resolution
    out = {}
    for mode in args.modes.split(","):
        spec = spec_for(args, resolution, mode, args.profile_batch)
        flow, x, optimizer = build(spec)
        step = step_fn(flow, x, optimizer, spec)
        for _ in range(3):
            step()
        times, cpu_times = [], []
        for _ in range(args.profile_steps):
            sync(args.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            sync(args.device)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        steps = 3
        activities = [ProfilerActivity.CPU]
        if args.device.startswith("cuda"):
            activities.append(ProfilerActivity.CUDA)
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                with record_function("step"):
                    step()
        events = prof.key_averages()
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        out[mode] = {
            "step_s": round(min(times), 5),
            "step_s_median": round(statistics.median(times), 5),
            "step_cpu_s": round(min(cpu_times), 5),
            "images_per_s": round(args.profile_batch / min(times), 2),
            "top_ops_self_cpu": [
                {
                    "op": e.key,
                    "ms_per_step": round(e.self_cpu_time_total / steps / 1e3, 3),
                    "share": round(e.self_cpu_time_total / total, 4),
                    "calls_per_step": e.count // steps,
                }
                for e in top[:15]
            ],
        }
    return {
        "machine": machine(args.threads),
        "config": {"config": args.config, "resolution": resolution, "batch": args.profile_batch},
        "profile": out,
    }


def run(args: argparse.Namespace) -> int:
    if args.worker:
        result = json.dumps(measure(json.loads(args.worker)))
        if args.json_out:
            atomic_write_text(args.json_out, result + "\n")
        print(result, flush=True)
        return 0
    if args.profile:
        emit(profile(args))
        return 0
    torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        print(f"error: unknown memory modes {sorted(unknown)}; use {MODES}", file=sys.stderr)
        return 2
    before = machine(args.threads)
    # the ceiling in the step's own precision: fp32 matmul, or bf16 under autocast
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    n = 8192 if args.device.startswith("cuda") else 2048
    rate = matmul_rate(n, device=args.device, dtype=dtype)
    result: dict = {"machine": before, "matmul_flop_s": rate, "args": vars(args)}
    if args.max_batch:
        result["max_batch"] = [
            largest_batch(args, r, mode) for r in args.resolutions for mode in modes
        ]
    else:
        result["by_resolution"] = [
            with_fraction(run_spec(spec_for(args, r, mode, args.batch)), rate)
            for r in args.resolutions
            for mode in modes
        ]
        result["by_depth"] = [
            with_fraction(
                run_spec(spec_for(args, args.depth_resolution, mode, args.batch, d)), rate
            )
            for d in args.depths
            for mode in modes
        ]
    result["load_avg_after"] = machine(args.threads)["load_avg_1_5_15"]
    emit(result)
    return 0
