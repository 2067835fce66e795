"""Distributed setup: the only module that imports deepspeed.

Rank getters fall back to 0/0/1 before (or without) initialisation, so a plain ``python -m pipeline train``
runs the same code as the ``deepspeed`` launcher or ``torchrun``. On a machine without CUDA, DeepSpeed runs
on its CPU accelerator with the gloo backend.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import check_batch, deep_merge

# DeepSpeed picks its accelerator at import time; without CUDA it must be told to use the CPU one.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def say(msg: str) -> None:
    """A line of the run's story, printed once: by the main rank."""
    if is_main():
        print(msg, flush=True)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def free_port(ports: range | None = None) -> int:
    """A TCP port free on 127.0.0.1 now: the first free one of ``ports`` (rendezvous ports of
    concurrent launches kept in a known range), else one the OS picks."""
    for port in ports if ports is not None else [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {ports}")


def setup(timeout_s: int = 1800) -> None:
    """Join the process group (a 1-rank group when no launcher set RANK/WORLD_SIZE)."""
    if dist.is_initialized():
        return
    if (
        "RANK" not in os.environ
    ):  # plain process: a group of one, so the engine code path is the same
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    _unlink_shm_workspace()


def _unlink_shm_workspace() -> None:
    """Remove the name of DeepSpeed's CPU shared-memory all-reduce segment once every rank has it.

    On its CPU accelerator DeepSpeed (0.19) creates one ~66 MB ``/dev/shm`` segment per rank when all
    ranks share a node, maps the other ranks' segments, and never unlinks them: every multi-rank
    launch would leave RAM-backed files behind. After a barrier every rank has mapped every
    segment (DeepSpeed maps them inside ``init_distributed``), so each rank removes its own name;
    the mappings live on until the process exits, even if it is killed.
    """
    if torch.cuda.is_available():
        return
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank()
    )
    if world_size() > 1:
        dist.barrier()
    with contextlib.suppress(FileNotFoundError):  # ranks on several nodes: DeepSpeed made none
        os.unlink(os.path.join("/dev/shm", name))


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum | max | min); a no-op on one rank."""
    if dist.is_initialized() and world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(t, op=ops[op])
    return t


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """[R, *t.shape]: every rank's ``t``, in rank order ([1, ...] on one rank)."""
    if not (dist.is_initialized() and world_size() > 1):
        return t[None]
    rows = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(rows, t.contiguous())
    return torch.stack(rows)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# DeepSpeed's defaults for the zero_optimization keys that size its ZeRO 1/2 gradient bucket
# (deepspeed/runtime/zero/config.py), for memory plans made without importing it
ZERO_BUCKET_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "overlap_comm": False,
    "contiguous_gradients": True,
}


def deepspeed_config(train: Any, world: int, cuda: bool | None = None) -> dict:
    """DeepSpeed's JSON, generated from our train section: the single source of truth. `cuda`:
    the JSON for CUDA ranks or CPU ones (default: this machine's)."""
    check_batch(train, world)  # a ConfigError naming the numbers
    global_batch = train.micro_batch * train.grad_accum * world
    cfg: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": float(train.grad_clip),
        "zero_optimization": {"stage": int(train.zero_stage)},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if not (torch.cuda.is_available() if cuda is None else cuda):
        cfg["zero_allow_untested_optimizer"] = True
    # train.deepspeed's knobs on top; the config refused the keys the pipeline owns
    return deep_merge(cfg, dict(getattr(train, "deepspeed", {}) or {}))


def build_engine(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, train: Any
):
    """Wrap model + plain torch optimizer + LR scheduler in a DeepSpeed engine."""
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(train, world_size()),
    )
    engine.checkpoint_engine = _weights_only_checkpoint_engine(engine)
    return engine, optimizer, scheduler


def _weights_only_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``.

    DeepSpeed unpickles its checkpoint files with ``weights_only=False``, i.e. it would run code
    found in a checkpoint; resuming from a folder someone else wrote must never do that. The ZeRO
    1/2 optimizer states hold DeepSpeed's loss scaler objects (plain attribute holders, also with
    fp32 and bf16), its ZeRO-stage enum and its parameter-fragment addresses (two integers), which
    are allowed by name; nothing else is.
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine(engine._config)
