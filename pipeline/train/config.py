"""The train section of the config tree (owned by pipeline/train)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pipeline.ranges import NON_NEGATIVE, POSITIVE, Range, at_least


@dataclass
class TrainConfig:
    steps: int = 20  # optimizer steps
    micro_batch: int = 16  # per rank, per forward
    grad_accum: int = 1
    global_batch: int = 0  # 0 = derived (micro_batch x grad_accum x ranks); else asserted equal
    lr: float = 1e-3
    warmup_steps: int = 0
    lr_decay: Literal["none", "cosine"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    zero_stage: Literal[0, 1, 2] = 0
    # bf16 = subnets under torch.autocast with fp32 master weights; log-dets, prior and loss stay fp32
    # (docs/design.md §3.5 (6)), so DeepSpeed itself runs fp32.
    precision: Literal["fp32", "bf16"] = "fp32"
    # torch.compile the whole model (Inductor, static shapes) for its training and validation
    # forward passes; the first step of each compiles (0.5-2 min on a CPU core). Off by default: it
    # pays only where the forward has few graph breaks (README, "Configs")
    compile: bool = False
    # on several ranks, each certifies its share of the spectral-norm groups once per step and one
    # all_gather hands on the rest (train/certificate.py): bit for bit the unshared computation
    share_certificate: bool = True
    seed: int = 0
    init_batches: int = 1  # batches for the ActNorm data-dependent init
    log_every: int = 1
    save_every: int = 10
    keep_last: int = 3
    val_every: int = 0  # 0: validate at the end only
    val_batches: int = 0  # 0: the whole val split
    samples: int = 16  # images in the final sample grid
    temperature: float = 0.7
    optimum_images: int = 2048  # train images for the linear-flow optimum reference; 0 = skip
    sample_every: int = 0  # steps between sample grids logged as artifacts; 0 = at the end only
    # DeepSpeed's own knobs, merged into the engine JSON generated from this section (e.g.
    # train.deepspeed.zero_optimization.overlap_comm=true, train.deepspeed.flops_profiler.enabled=true);
    # keys the pipeline sets itself (DEEPSPEED_OWNED) are refused with the key to use instead
    deepspeed: dict[str, Any] = field(default_factory=dict)
    # keys a resume may change although they change the model, the data stream or the optimizer
    # (comma-separated, e.g. data.shards,train.grad_clip): a deliberate override; which keys it can
    # lift and which never change on resume: pipeline/train/compat.py
    allow_changed: str = ""

    RANGES: ClassVar[dict[str, Range]] = {
        "steps": at_least(1),
        "micro_batch": at_least(1),
        "grad_accum": at_least(1),
        "global_batch": NON_NEGATIVE,
        "lr": POSITIVE,
        "warmup_steps": NON_NEGATIVE,
        "min_lr_ratio": Range(0, 1),
        "weight_decay": NON_NEGATIVE,
        "grad_clip": NON_NEGATIVE,
        "seed": NON_NEGATIVE,
        "init_batches": at_least(1),
        "log_every": NON_NEGATIVE,
        "save_every": NON_NEGATIVE,
        "keep_last": NON_NEGATIVE,
        "val_every": NON_NEGATIVE,
        "val_batches": NON_NEGATIVE,
        "samples": at_least(1),
        "temperature": POSITIVE,
        "optimum_images": NON_NEGATIVE,
        "sample_every": NON_NEGATIVE,
    }


# DeepSpeed JSON keys ("a.b" for nested ones) that the train section decides -> what to set instead.
DEEPSPEED_OWNED = {
    "train_batch_size": "train.micro_batch and train.grad_accum (train.global_batch to assert it)",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16": "train.precision (bf16 autocasts the subnets; log-dets and the loss stay fp32)",
    "fp16": "train.precision",
    "amp": "train.precision",
    "optimizer": "train.lr and train.weight_decay (the pipeline passes its own AdamW)",
    "scheduler": "train.lr_decay, train.warmup_steps and train.min_lr_ratio",
}


def deepspeed_owned(passthrough: dict, prefix: str = "") -> list[str]:
    """The keys of ``passthrough`` (a train.deepspeed mapping) that the pipeline owns."""
    found = []
    for key, value in passthrough.items():
        dotted = f"{prefix}{key}"
        if dotted in DEEPSPEED_OWNED:
            found.append(dotted)
        elif isinstance(value, dict):
            found += deepspeed_owned(value, f"{dotted}.")
    return found


@dataclass
class FaultConfig:
    """Deliberate faults, for testing the divergence guard end to end; all off by default."""

    nan_step: int = -1  # at this step, rank `nan_rank` feeds a NaN batch
    nan_rank: int = 0
    lr_spike_step: int = -1  # from this step, the LR is multiplied by `lr_spike_factor` ...
    lr_spike_steps: int = 0  # ... for this many steps
    lr_spike_factor: float = 1000.0
    sigkill_step: int = -1  # after the checkpoint at this step, every rank SIGKILLs itself
    damage_step: int = -1  # after this step's update, the split priors' log σ bias is set ...
    damage_log_std: float = 1000.0  # ... to this (faults.maybe_damage_prior)

    RANGES: ClassVar[dict[str, Range]] = {
        "nan_rank": NON_NEGATIVE,
        "lr_spike_steps": NON_NEGATIVE,
        "lr_spike_factor": POSITIVE,
    }
