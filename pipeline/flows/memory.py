"""Where backprop through the flow steps gets its activations from (`ModelConfig.memory`).

    store       autograd keeps every intermediate tensor of every step: the fastest; activation
                memory grows linearly with depth.
    checkpoint  torch.utils.checkpoint per flow step (non-reentrant): keeps each step's input and
                re-runs the step in the backward pass; memory ∝ steps × one activation, plus the
                internals of one step.
    invertible  a run of consecutive flow steps with exact inverses is one autograd Function that
                keeps only the run's output y_K. Its backward walks the run in reverse: it
                reconstructs each block's input x_k = f_k⁻¹(y_k) without autograd, re-runs
                f_k(x_k) with autograd and takes the vector-Jacobian products for x_k and f_k's
                parameters, log-det included (the reversible backprop of RevNet, Gomez et al.
                2017, used by Glow). Activation memory no longer grows with depth; the price is
                one inverse and one extra forward per block in the backward pass, and gradients
                that agree with `store` to the rounding error of the reconstruction.

Residual steps have an iterative inverse (a fixed point to a tolerance, whose error the chain of
reconstructions would amplify by up to 1/(1 - c) per block) and a random Hutchinson log-det, so
under `invertible` they are checkpointed instead: exact gradients, memory ∝ steps.

A re-run must compute the map the forward pass computed: spectral-norm power iterations are
frozen while a step is re-run (they advanced once, in the forward pass), the forward pass's
autocast state is restored, and checkpointing restores the RNG state (Hutchinson probes).
Memory modes apply only where a graph is built (training); without autograd every mode is `store`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Literal

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from pipeline.flows.base import FlowBlock, frozen, reuse_weights

MemoryMode = Literal["store", "checkpoint", "invertible"]
Step = Sequence[FlowBlock]


def run_steps(
    steps: Sequence[Step], h: torch.Tensor, mode: MemoryMode
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """h through `steps` (each a sequence of blocks) -> (output, one log-det [B] per block)."""
    if mode == "store" or not _builds_graph(steps, h):
        return _run_blocks([block for step in steps for block in step], h)
    if mode == "checkpoint":
        return _chain(steps, h, _checkpointed)
    if mode != "invertible":
        raise ValueError(f"model.memory must be store, checkpoint or invertible, got {mode!r}")
    # consecutive steps with exact inverses form one run, of which only the output is kept; a
    # step without (residual) ends the run and is checkpointed
    logdets: list[torch.Tensor] = []
    run: list[FlowBlock] = []
    for step in [*steps, None]:
        if step is not None and all(block.exact_inverse for block in step):
            run += step
            continue
        for blocks, method in ((run, _invertible), (step, _checkpointed)):
            if blocks:
                h, block_logdets = method(blocks, h)
                logdets += block_logdets
        run = []
    return h, logdets


def _builds_graph(steps: Sequence[Step], h: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return h.requires_grad or any(
        p.requires_grad for step in steps for block in step for p in block.parameters()
    )


def _run_blocks(blocks: Sequence[FlowBlock], h: torch.Tensor):
    logdets = []
    for block in blocks:
        h, logdet = block(h)
        logdets.append(logdet)
    return h, logdets


def _chain(steps: Sequence[Step], h: torch.Tensor, run: Callable):
    logdets: list[torch.Tensor] = []
    for step in steps:
        if step:
            h, step_logdets = run(step, h)
            logdets += step_logdets
    return h, logdets


@contextmanager
def _frozen_all(blocks: Sequence[FlowBlock]) -> Iterator[None]:
    with ExitStack() as stack:
        for block in blocks:
            stack.enter_context(frozen(block))
        yield


def _checkpointed(step: Step, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    calls = 0

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal calls
        with ExitStack() as stack:
            if calls:  # the backward pass's re-run: no second power-iteration update
                stack.enter_context(_frozen_all(step))
            calls += 1
            y, logdets = _run_blocks(step, x)
        return y, torch.stack(logdets)

    y, logdets = checkpoint(run, h, use_reentrant=False, preserve_rng_state=True)
    return y, list(logdets.unbind(0))


def _invertible(blocks: Sequence[FlowBlock], h: torch.Tensor):
    params = [p for block in blocks for p in block.parameters()]
    y, logdets = _InvertibleRun.apply(h, tuple(blocks), *params)
    return y, list(logdets.unbind(0))


class _InvertibleRun(torch.autograd.Function):
    """(x, blocks, *their parameters) -> (y, log-dets [n_blocks, B]), saving only y (see the
    module docstring). Parameters are explicit inputs so that their gradients reach them through
    autograd (and DeepSpeed's gradient hooks) like any other."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: tuple[FlowBlock, ...], *params: torch.Tensor):
        device = x.device.type
        ctx.blocks = blocks
        ctx.autocast = (
            device,
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device),
            torch.is_autocast_cache_enabled(),
        )
        # a Function's forward runs without autograd; the backward pass reopens the scope to
        # invert with the weights formed here (no optimizer step comes in between)
        with reuse_weights() as ctx.scope:
            y, logdets = _run_blocks(blocks, x)
        ctx.save_for_backward(y)
        return y, torch.stack(logdets)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor, grad_logdets: torch.Tensor):
        y = ctx.saved_tensors[0].detach()
        blocks = ctx.blocks
        device, enabled, dtype, cache = ctx.autocast
        param_grads: list[list[torch.Tensor | None]] = []
        with (
            torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache),
            _frozen_all(blocks),
            reuse_weights(ctx.scope),
        ):
            for k in reversed(range(len(blocks))):
                block = blocks[k]
                wants_x = k > 0 or ctx.needs_input_grad[0]
                rerun = block.rerun(y, input_grad=wants_x)
                params = list(block.parameters())
                trainable = [p for p in params if p.requires_grad]
                pairs = [
                    (out, cot)
                    for out, cot in ((rerun.y, grad_y), (rerun.logdet, grad_logdets[k]))
                    if out.requires_grad
                ]
                leaves = rerun.leaves if wants_x else []
                inputs = leaves + trainable
                grads: Sequence[torch.Tensor | None] = [None] * len(inputs)
                if pairs and inputs:
                    grads = torch.autograd.grad(
                        [out for out, _ in pairs],
                        inputs,
                        [cot for _, cot in pairs],
                        allow_unused=True,
                    )
                if wants_x:
                    grad_y = rerun.join(
                        *(
                            torch.zeros_like(leaf) if grad is None else grad
                            for leaf, grad in zip(leaves, grads, strict=False)
                        )
                    )
                    grads = grads[len(leaves) :]
                by_param = dict(zip(map(id, trainable), grads, strict=True))
                param_grads.append([by_param.get(id(p)) for p in params])
                y = rerun.x
        grad_x = grad_y if ctx.needs_input_grad[0] else None
        flat = [g for block_grads in reversed(param_grads) for g in block_grads]
        return (grad_x, None, *flat)


@contextmanager
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
