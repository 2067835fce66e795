"""What a run will be, without training it (`python -m pipeline plan`): the batch arithmetic, the
DeepSpeed JSON, the bytes each rank holds, the peak against a GPU's memory with a verdict, and the
read rate the shards must sustain.

Bytes per rank = model states (counted from the parameters, ZeRO stage by stage) + activations
(measured). The activations are measured, not modelled: one forward and backward of the real
model, built for the config's resolution, on a small batch at a reduced resolution on the CPU,
under LiveTensors (below), which records at every allocation the live bytes of per-image
tensors and of the rest. The scaling rule: every per-image tensor of the flow is a feature map, so
its bytes grow with batch × pixels; the rest (cast and normalised weights, the spectral
normaliser's work, weight gradients on their way to .grad) does not. So at each moment t of the
run

    bytes(t) = other(t) + (B / B₀)·(r / r₀)²·per_image(t),    peak = max over t

(where the peak falls moves with the batch). Depth: measured at 3 and 4 flow steps per level;
the peak of each phase (forward, backward) at the config's depth is on the line through the two,
and the larger phase counts. From 3 steps on a level has a first, a middle and a last step and
each further step repeats a middle one; at 2, the invertible backward pass lacks a segment that
follows a whole one, so a line through 2 and 3 would multiply that shortfall at depth.
tests/test_plan.py checks the rule at larger sizes and depths, and against the resident-set peak
of real CPU steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import time
import typing
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from pipeline.config import Config, to_dict
from pipeline.data import ShardError, read_manifest, resolve_shards
from pipeline.data.ingest import MIN_VAL_SHARDS, SHARD_SIZE
from pipeline.distributed import ZERO_BUCKET_DEFAULTS, deepspeed_config
from pipeline.flows import build_flow
from pipeline.flows.lipschitz import group_cost, top_numel
from pipeline.flows.memory import MemoryMode

MODES = typing.get_args(MemoryMode)
MEASURED_DEPTHS = (3, 4)
BATCH_CAP = 2**16  # the largest micro-batch a plan looks for
GiB = 2**30
# not in the activations or the model states: what a GPU run holds beyond its tensors
NOT_COUNTED = (
    "the CUDA context and NCCL buffers (about 1 GiB), allocator fragmentation, kernel workspaces "
    "(cuDNN), the DataLoader's pinned batches"
)


class LiveTensors(TorchDispatchMode):
    """The bytes of the tensors created inside the mode that are alive, after every allocation,
    split into per-image tensors and the rest: `phases` are [events, 2] arrays of (other,
    per-image) bytes, one per phase of the run (`mark()` starts the next, e.g. the backward
    pass), so that the peak of the same run with the per-image part scaled by s is `peak(s)`, a
    maximum over the moments of the run (where the peak falls moves with s).

    Every op's outputs are seen (forward, backward, re-runs, checkpoint recomputation, casts), so
    this is what a device allocator would hold beyond what existed before: activations, gradients
    of activations, transients, weight-sized by-products; unlike bench train's `saved_tensor_bytes` it sees a
    checkpoint's internals and the backward pass. An output sharing an input's storage (a view, an
    in-place op) allocates nothing. Per-image: computed from `batch` (the tensors it was given)
    and with `batch_size` rows, the flow's layout for feature maps; so `batch_size` must differ
    from the leading size of any weight-sized gradient. Memory a kernel allocates internally
    (im2col buffers, cuDNN workspaces) is not seen."""

    def __init__(self, batch: Sequence[torch.Tensor], batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        self._live = [0, 0]
        self._events = [(0, 0)]
        self._marks = [0]  # where each phase starts: its first event is the bytes alive then
        self._counted = WeakIdKeyDictionary()  # storages seen allocated
        self._from_batch = WeakIdKeyDictionary({t.untyped_storage(): True for t in batch})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t.untyped_storage() for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)]
        from_batch = any(s in self._from_batch for s in inputs)
        pointers = {s.data_ptr() for s in inputs}
        for t in tree_leaves(out):
            if not torch.is_tensor(t):
                continue
            storage = t.untyped_storage()
            if from_batch:
                self._from_batch[storage] = True
            if storage.data_ptr() in pointers or storage in self._counted:
                continue
            self._counted[storage] = True
            kind = int(from_batch and t.dim() > 0 and t.shape[0] == self.batch_size)
            nbytes = storage.nbytes()
            self._live[kind] += nbytes
            self._events.append((self._live[0], self._live[1]))
            weakref.finalize(storage, self._free, kind, nbytes)
        return out

    def _free(self, kind: int, nbytes: int) -> None:
        self._live[kind] -= nbytes

    def mark(self) -> None:
        self._marks.append(len(self._events))
        self._events.append((self._live[0], self._live[1]))

    @property
    def phases(self) -> list[np.ndarray]:
        return np.split(np.array(self._events, dtype=np.float64), self._marks[1:])

    def peak(self, scale: float = 1.0) -> float:
        return max(float((p[:, 0] + scale * p[:, 1]).max()) for p in self.phases)


@dataclasses.dataclass
class Activations:
    """Live bytes (LiveTensors.phases: forward, backward) of one forward + backward per memory
    mode and measured depth, at `batch` images of `resolution`², with the model's parameter
    count and buffer bytes at each depth."""

    resolution: int
    batch: int
    depths: tuple[int, ...]
    phases: dict[str, list[list[np.ndarray]]]  # mode -> depth -> phase -> [events, 2]
    parameters: list[int]
    buffer_bytes: list[int]

    def peak(self, mode: str, batch: int, resolution: int, steps: int) -> float:
        """Activation bytes at the peak of a step of `batch` images of `resolution`² with `steps`
        flow steps per level (the module docstring's rule), phase by phase."""
        scale = batch / self.batch * (resolution / self.resolution) ** 2
        peaks = [
            [float((p[:, 0] + scale * p[:, 1]).max()) for p in phases]
            for phases in self.phases[mode]
        ]
        return max(along_depth(self.depths, column, steps) for column in zip(*peaks, strict=True))


def along_depth(depths: Sequence[int], values: Sequence[float], steps: int) -> float:
    """The value at `steps` on the line through the measured depths (itself if one was measured)."""
    if len(depths) == 1:
        return values[0]
    (k0, k1), (v0, v1) = depths, values
    return v0 + (steps - k0) * (v1 - v0) / (k1 - k0)


def measure_activations(
    cfg: Config, resolution: int, say: Callable[[str], None] = lambda line: None
) -> Activations:
    """One forward + backward per memory mode and depth at `resolution`² (see the module
    docstring); the model is built for cfg.data.resolution, as the run builds it."""
    steps, bf16 = cfg.model.steps, cfg.train.precision == "bf16"
    depths = (steps,) if steps <= MEASURED_DEPTHS[-1] else MEASURED_DEPTHS
    # the spectral normaliser's frequency tables are made once per process and kept: made inside
    # a measurement, they would count at the first depth only and bend the line
    with torch.no_grad():
        step(flow_at(cfg, min(steps, 1)), torch.zeros(1, 3, resolution, resolution), bf16)
    phases: dict[str, list[list[np.ndarray]]] = {mode: [] for mode in MODES}
    parameters, buffer_bytes = [], []
    batch = 0
    for depth in depths:
        start = time.perf_counter()
        flow = flow_at(cfg, depth)
        parameters.append(sum(p.numel() for p in flow.parameters()))
        buffer_bytes.append(sum(b.numel() * b.element_size() for b in flow.buffers()))
        for p in flow.parameters():  # gradients live in .grad through the step: model states
            p.grad = torch.zeros_like(p)
        batch = batch or tracer_batch(flow, depths)
        say(f"built the model at {depth} steps per level ({time.perf_counter() - start:.1f} s)")
        x = torch.rand(batch, 3, resolution, resolution) - 0.5
        for mode in MODES:
            start = time.perf_counter()
            flow.memory = mode
            with LiveTensors([x], batch) as live:
                step(flow, x, bf16, live.mark)
            phases[mode].append(live.phases)
            say(
                f"measured {mode} at {depth} steps per level, batch {batch} of {resolution}² "
                f"({time.perf_counter() - start:.1f} s)"
            )
    return Activations(resolution, batch, depths, phases, parameters, buffer_bytes)


def flow_at(cfg: Config, depth: int) -> torch.nn.Module:
    """The config's model with `depth` steps per level, for its resolution, vectors warm."""
    r = cfg.data.resolution
    flow = build_flow(dataclasses.replace(cfg.model, steps=depth), (3, r, r), cfg.data.n_bits)
    warm_vectors(flow)
    return flow


def step(
    flow: torch.nn.Module, x: torch.Tensor, bf16: bool, between: Callable[[], None] = lambda: None
) -> None:
    """The training step's forward (bf16: under autocast) and, with autograd, its backward."""
    with torch.autocast("cpu", torch.bfloat16, bf16):
        out = flow(x)
    between()
    if torch.is_grad_enabled():
        out["bpd"].float().mean().backward()


def certificate_plan(cfg: Config, ranks: int, depth: int = 4, repeats: int = 3) -> dict:
    """The spectral-norm certificate per optimizer step and rank (train/certificate.py), timed on
    this CPU: one held normalisation of the model at `depth` steps per level (median of
    `repeats`, after one untimed), scaled to the config's depth (each group holds one conv per
    flow step: its cost and bytes grow in proportion); shared by `ranks` as the run shares it
    (units assigned by their cost from shapes): the largest share's time and the all_gather's
    bytes."""
    import statistics

    from pipeline.train.certificate import assign, split

    flow = flow_at(cfg, depth)
    flow.hold_normalisation().release()  # untimed: the first walk of each kernel's sizes
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        flow.hold_normalisation().release()
        seconds.append(time.perf_counter() - start)
    groups = [(group_cost(g) / depth, top_numel(g) / depth) for g in flow.normalised_groups()]
    steps = cfg.model.steps
    total = statistics.median(seconds) * steps / depth
    costs = [cost * steps for cost, _ in groups]
    share, sent = 1.0, 0.0
    if cfg.train.share_certificate and ranks > 1 and groups:
        units = split(costs, [steps] * len(groups), ranks)
        unit_costs = [groups[g][0] * (b - a) for g, a, b in units]
        loads, numels = [0.0] * ranks, [0.0] * ranks
        for (g, a, b), owner in zip(units, assign(unit_costs, ranks), strict=True):
            loads[owner] += groups[g][0] * (b - a)
            numels[owner] += groups[g][1] * (b - a)
        share, sent = max(loads) / sum(loads), max(numels) * 4  # float32 scalars
    return {
        "groups": len(groups),
        "seconds_per_step_all": total,
        "seconds_per_step_per_rank": total * share,
        "gather_bytes_sent_per_rank": int(sent),
        "gather_bytes_received_per_rank": int(sent * (ranks - 1)),
        "measured": f"on this CPU, {torch.get_num_threads()} threads, at {depth} steps per level",
    }


def measuring_resolution(cfg: Config) -> int:
    """The smallest image the model takes (2^levels), or 32² if that is larger, but no more
    than the run's: per-image bytes are exactly proportional to pixels, so measuring small
    loses nothing and saves the time."""
    return min(cfg.data.resolution, max(2**cfg.model.levels, 32))


def warm_vectors(flow: torch.nn.Module) -> None:
    """Load the flow as a checkpoint with warm spectral vectors would load: the cold start's
    eigen-solve runs once, under no_grad, before the first step (no part of a step's memory) and
    takes most of the time; the vectors' values do not change what a step allocates."""
    state = flow.state_dict()
    for key in state:
        if key.endswith("spectral_warm"):
            state[key] = torch.ones_like(state[key])
    flow.load_state_dict(state)


def tracer_batch(flow: torch.nn.Module, depths: Sequence[int]) -> int:
    """A batch size LiveTensors can tell from weight-sized gradients: none has it as its leading
    size (parameters' leading sizes, 1 for reductions with keepdim, a depth for weights stacked
    per level)."""
    taken = {1, *depths, *(p.shape[0] for p in flow.parameters() if p.dim())}
    return next(b for b in range(2, 2**16) if b not in taken)


def model_states(parameters: int, buffer_bytes: int, stage: int, ranks: int, zero: dict) -> dict:
    """Bytes per rank that live through a step: fp32 parameters (train.precision=bf16 only
    autocasts), buffers, fp32 gradients and AdamW's two moments. ZeRO (Rajbhandari et al. 2020)
    stage 1 partitions the moments over the ranks, and DeepSpeed then keeps a fp32 copy of the
    rank's partition of the parameters (cloned even from fp32 ones) and a gradient bucket of
    `reduce_bucket_size` elements (two with overlap_comm); stage 2 partitions the gradients too."""
    p = 4 * parameters
    zero = {**ZERO_BUCKET_DEFAULTS, **zero}
    bucket = 4 * int(zero["reduce_bucket_size"]) * (2 if zero["overlap_comm"] else 1)
    return {
        "parameters": p,
        "buffers": buffer_bytes,
        "gradients": math.ceil(p / ranks) if stage == 2 else p,
        "optimizer": math.ceil(2 * p / ranks) if stage else 2 * p,
        "master_weights": math.ceil(p / ranks) if stage else 0,
        "gradient_bucket": bucket if stage and zero["contiguous_gradients"] else 0,
    }


def largest_batch(fits: Callable[[int], bool], cap: int = BATCH_CAP) -> int:
    """The largest batch b ≤ cap with fits(b), fits being monotone (0 if not even one image)."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= cap and fits(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def memory_plan(
    cfg: Config, acts: Activations, ranks: int, gpu_memory: int, ds: dict
) -> dict[str, Any]:
    """Model states, activations and peak per rank for each memory mode, the largest micro-batch
    each fits, and the verdict for the config's mode."""
    train, steps, r = cfg.train, cfg.model.steps, cfg.data.resolution
    parameters = round(along_depth(acts.depths, acts.parameters, steps))
    buffer_bytes = round(along_depth(acts.depths, acts.buffer_bytes, steps))
    zero = ds.get("zero_optimization", {})

    def states(stage: int) -> int:
        return sum(model_states(parameters, buffer_bytes, stage, ranks, zero).values())

    def peak(mode: str, batch: int, stage: int = train.zero_stage) -> float:
        return states(stage) + acts.peak(mode, batch, r, steps)

    by_mode = {
        mode: {
            "activations": round(acts.peak(mode, train.micro_batch, r, steps)),
            "peak": round(peak(mode, train.micro_batch)),
            "largest_micro_batch": largest_batch(lambda b, m=mode: peak(m, b) <= gpu_memory),
        }
        for mode in MODES
    }
    mode = cfg.model.memory
    spare = gpu_memory - by_mode[mode]["peak"]
    if spare >= 0:
        verdict = f"fits with {spare / GiB:.1f} GiB spare"
    else:
        fixes = [f"model.memory={m}" for m in MODES if by_mode[m]["peak"] <= gpu_memory]
        if by_mode[mode]["largest_micro_batch"]:
            fixes.append(f"a micro_batch of {by_mode[mode]['largest_micro_batch']}")
        if train.zero_stage < 2 and peak(mode, train.micro_batch, 2) <= gpu_memory:
            fixes.append("train.zero_stage=2")
        one = min(peak(m, 1) for m in MODES)
        verdict = "does not fit: " + (
            f"use {' or '.join(fixes)}"
            if fixes
            else f"not even one image in any memory mode ({one / GiB:.1f} GiB at one image, "
            f"{states(train.zero_stage) / GiB:.1f} GiB of it model states)"
        )
    return {
        "parameters": parameters,
        "model_states": model_states(parameters, buffer_bytes, train.zero_stage, ranks, zero),
        "model_states_total": states(train.zero_stage),
        "by_mode": by_mode,
        "mode": mode,
        "gpu_memory": gpu_memory,
        "verdict": verdict,
    }


def data_plan(cfg: Config, ranks: int, per_rank_images: int, step_s: float) -> dict[str, Any]:
    """The shards' sizes (from the manifest and the files, or estimated at raw RGB bytes per
    image when the set is not there), whether each split has a shard for every reader (the
    loader refuses fewer), and the read rate each rank needs at `step_s` seconds per step."""
    data = cfg.data
    try:
        folder = resolve_shards(data)
        records = read_manifest(folder)["shards"]
        sizes = [(folder / record["name"]).stat().st_size for record in records["train"]]
        images = sum(int(record["count"]) for record in records["train"])
        out: dict[str, Any] = {
            "source": str(folder),
            "estimated": False,
            "train_images": images,
            "shards": {"train": len(sizes), "val": len(records["val"])},
            "shard_bytes": {"min": min(sizes), "mean": round(np.mean(sizes)), "max": max(sizes)},
            "bytes_per_image": round(sum(sizes) / max(images, 1)),
        }
    except (ShardError, FileNotFoundError) as e:
        per_image = 3 * data.resolution**2  # PNG is lossless; faces compress below raw RGB
        images, shards, why = None, None, str(e)
        if data.source == "synthetic":  # written on first use, split as prepare_synthetic does
            images = data.synthetic_train
            shards = {
                "train": min(data.synthetic_shards, images),
                "val": min(data.synthetic_shards, data.synthetic_val),
            }
            why = "the synthetic set is written by the first train run"
        out = {
            "source": f"estimated at raw RGB size ({why})",
            "estimated": True,
            "train_images": images,
            "shards": shards,
            "shard_bytes": {
                "mean": per_image * (math.ceil(images / shards["train"]) if shards else SHARD_SIZE)
            },
            "bytes_per_image": per_image,
        }
    rate = per_rank_images * out["bytes_per_image"] / step_s
    readers = ranks * max(1, data.workers)
    out.update(
        readers=readers,
        enough_shards=None if out["shards"] is None else min(out["shards"].values()) >= readers,
        step_s=step_s,
        read_bytes_per_s={"rank": round(rate), "all_ranks": round(rate * ranks)},
    )
    if out["train_images"]:
        out["steps_per_epoch"] = out["train_images"] // (per_rank_images * ranks)
    return out


def keep_freed_memory() -> None:
    """Have glibc keep freed memory for reuse, as a GPU's caching allocator does. By default it
    maps each large block afresh and unmaps it when freed, so the spectral normaliser's transients
    (hundreds of MB, several per level and pass at 1024²) cost a page fault per page: over a third
    of the plan's CPU time. Only speed changes: LiveTensors counts tensors, not the heap. A no-op
    without glibc."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        for option in (-3, -1):  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (malloc.h)
            libc.mallopt(option, 2**31 - 1)


def make_plan(
    cfg: Config,
    nodes: int,
    gpus_per_node: int,
    gpu_memory: int,
    step_s: float,
    say: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """The plan as one JSON-able mapping (the command prints `format_plan` of it)."""
    start = time.perf_counter()
    keep_freed_memory()
    ranks = nodes * gpus_per_node
    train = cfg.train
    ds = deepspeed_config(train, ranks, cuda=True)  # checks the batch arithmetic
    per_rank = train.micro_batch * train.grad_accum
    resolution = measuring_resolution(cfg)
    acts = measure_activations(cfg, resolution, say)
    memory = memory_plan(cfg, acts, ranks, gpu_memory, ds)
    data = data_plan(cfg, ranks, per_rank, step_s)
    say("read the shard manifest" if not data["estimated"] else "estimated the shards")
    certificate = certificate_plan(cfg, ranks) if cfg.model.spectral_norm else None
    say("timed the certificate")
    return {
        "config": to_dict(cfg),
        "cluster": {"nodes": nodes, "gpus_per_node": gpus_per_node, "ranks": ranks},
        "batch": {
            "micro_batch": train.micro_batch,
            "grad_accum": train.grad_accum,
            "per_rank": per_rank,
            "global": per_rank * ranks,
        },
        "deepspeed": ds,
        "memory": memory,
        "activations_measured": {
            "resolution": acts.resolution,
            "batch": acts.batch,
            "depths": list(acts.depths),
            "device": "cpu",
            "rule": "bytes(t) = other(t) + (B/B0)·(r/r0)²·per_image(t), peak over t; per phase "
            "(forward, backward) linear in steps per level through the measured depths",
        },
        "not_counted": NOT_COUNTED,
        "data": data,
        "certificate": certificate,
        "seconds": round(time.perf_counter() - start, 1),
    }


def size(n: float) -> str:
    """Bytes in the largest binary unit that keeps a whole number in front."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_plan(plan: dict[str, Any], path: Path | None = None) -> str:
    """The plan in a screenful."""
    cfg, c, b, m, d = plan["config"], plan["cluster"], plan["batch"], plan["memory"], plan["data"]
    a = plan["activations_measured"]
    model = cfg["model"]
    lines = [
        f"cluster      {c['nodes']} nodes × {c['gpus_per_node']} GPUs = {c['ranks']} ranks, "
        f"{size(m['gpu_memory'])} each",
        f"batch        micro_batch {b['micro_batch']} × grad_accum {b['grad_accum']} = "
        f"{b['per_rank']} images per rank per step; × {c['ranks']} ranks = {b['global']} global",
        f"deepspeed    {json.dumps(plan['deepspeed'])}",
        f"model        {m['parameters']:,} parameters ({model['levels']} levels × "
        f"{model['steps']} steps, width {model['width']}); zero_stage "
        f"{cfg['train']['zero_stage']}, precision {cfg['train']['precision']}",
        "per rank     "
        + " + ".join(f"{k.replace('_', ' ')} {size(v)}" for k, v in m["model_states"].items() if v)
        + f" = {size(m['model_states_total'])} of model states",
        f"activations  at micro_batch {b['micro_batch']} of {cfg['data']['resolution']}², from "
        f"batch {a['batch']} of {a['resolution']}² at {' and '.join(map(str, a['depths']))} steps "
        f"per level on the CPU: {a['rule']}",
    ]
    for mode, row in m["by_mode"].items():
        largest = row["largest_micro_batch"]
        lines.append(
            f"  {mode:<11}activations {size(row['activations'])}, peak {size(row['peak'])}, "
            f"largest micro_batch {'≥ ' if largest == BATCH_CAP else ''}{largest}"
            + ("  (the config's)" if mode == m["mode"] else "")
        )
    if d["shards"] is None:
        shards = (
            f"; each split needs a shard per reader, {d['readers']} (ranks × data.workers): at "
            f"`shards`' default {SHARD_SIZE} images a shard, {d['readers'] * SHARD_SIZE:,} train "
            "images"
        )
        if d["readers"] > MIN_VAL_SHARDS:
            shards += f"; for val pass --val-shard-size (at most {MIN_VAL_SHARDS} shards otherwise)"
    else:
        shards = f", {d['shards']['train']} train and {d['shards']['val']} val shards"
        if not d["enough_shards"]:
            shards += (
                f", fewer than the {d['readers']} readers (ranks × data.workers) need, one each: "
                "write smaller shards or lower data.workers"
            )
    lines += [
        f"verdict      model.memory={m['mode']}: {m['verdict']}",
        f"not counted  {plan['not_counted']}",
        f"data         {d['source']}: {size(d['bytes_per_image'])} per image, shards of "
        f"{size(d['shard_bytes']['mean'])}{shards}",
        f"read rate    {size(d['read_bytes_per_s']['rank'])}/s per rank, "
        f"{size(d['read_bytes_per_s']['all_ranks'])}/s in all, at an assumed {d['step_s']:g} s "
        "per step"
        + (f"; {d['steps_per_epoch']} steps per epoch" if "steps_per_epoch" in d else ""),
    ]
    if (cert := plan.get("certificate")) is not None:
        lines.append(
            f"certificate  {cert['seconds_per_step_per_rank']:.3g} s per step per rank "
            f"({cert['seconds_per_step_all']:.3g} s for all {cert['groups']} conv groups, "
            f"{cert['measured']}); all_gather {size(cert['gather_bytes_sent_per_rank'])} sent, "
            f"{size(cert['gather_bytes_received_per_rank'])} received per rank per step"
        )
    if path is not None:
        lines.append(f"written      {path} ({plan['seconds']:.0f} s)")
    return "\n".join(lines)
