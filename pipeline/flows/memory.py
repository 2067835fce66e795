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
                that agree with `store` to the rounding error of the reconstruction. A block with
                the generic re-run (inverse, then forward) joins the re-run of the block before
                it, up to a flow step's worth of blocks: one graph and one backward call instead
                of one each (Glow's actnorm and 1×1 conv re-run on their coupling's output).

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

from pipeline.flows.base import FlowBlock, Rerun, frozen, reuse_weights
from pipeline.flows.lipschitz import held_convs

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
    segment_size = max(map(len, steps), default=1)
    for step in [*steps, None]:
        if step is not None and all(block.exact_inverse for block in step):
            run += step
            continue
        if run:
            h, block_logdets = _invertible(run, h, segment_size)
            logdets += block_logdets
        if step:
            h, block_logdets = _checkpointed(step, h)
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
    calls, scope = 0, None

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal calls, scope
        with ExitStack() as stack:
            if calls:  # the backward pass's re-run: no second power-iteration update
                stack.enter_context(_frozen_all(step))
            # the re-run reopens the forward's scope: what was derived from the weights without
            # autograd (a spectral norm's eigensolves) is reused, not computed again
            scope = stack.enter_context(reuse_weights(scope))
            calls += 1
            y, logdets = _run_blocks(step, x)
        return y, torch.stack(logdets)

    y, logdets = checkpoint(run, h, use_reentrant=False, preserve_rng_state=True)
    return y, list(logdets.unbind(0))


def _invertible(blocks: Sequence[FlowBlock], h: torch.Tensor, segment_size: int):
    params = [list(block.parameters()) for block in blocks]
    segments = _segments(blocks, segment_size)
    flat = [p for block_params in params for p in block_params]
    # a held normalisation's scales (lipschitz.HeldNormalisation) are inputs as the parameters
    # are: their gradients leave through autograd, to the step's leaf or its graph to the weights
    held = [held_convs([block]) for block in blocks]
    scales = [conv._held for block_held in held for conv in block_held]
    y, logdets = _InvertibleRun.apply(
        h, tuple(blocks), params, segments, held, len(flat), *flat, *scales
    )
    return y, list(logdets.unbind(0))


def _segments(blocks: Sequence[FlowBlock], size: int) -> list[range]:
    """The backward pass re-runs `blocks` in segments, one graph each: a block that overrides
    `rerun` starts one (its re-run shares work with its inverse), a block with the generic re-run
    joins the segment before it, up to `size` blocks, so that a segment's graph is at most a flow
    step's: activation memory stays constant in depth."""
    starts = [
        k for k, block in enumerate(blocks) if k == 0 or type(block).rerun is not FlowBlock.rerun
    ]
    segments = []
    for first, end in zip(starts, [*starts[1:], len(blocks)], strict=True):
        segments += [range(k, min(k + size, end)) for k in range(first, end, size)]
    return segments


class _InvertibleRun(torch.autograd.Function):
    """(x, blocks, their parameters per block, segments, their held convs per block, the number
    of parameters, *the parameters, *the held scales) -> (y, log-dets [n_blocks, B]), saving only
    y (see the module docstring). Parameters are explicit inputs so that their gradients reach
    them through autograd (and DeepSpeed's gradient hooks) like any other; so are held scales,
    which the re-run replaces by leaves of its own to take their gradients."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        blocks: tuple[FlowBlock, ...],
        params: list[list[torch.Tensor]],
        segments: list[range],
        held: list[list],
        n_params: int,
        *inputs: torch.Tensor,
    ):
        device = x.device.type
        ctx.blocks, ctx.params, ctx.segments, ctx.held = blocks, params, segments, held
        ctx.scales = inputs[n_params:]  # held scales: a few scalars
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
        param_grads: list[Sequence[torch.Tensor | None]] = []
        # each held scale's stand-in: a leaf that the re-run normalises with
        convs = [conv for block_held in ctx.held for conv in block_held]
        held = list(zip(convs, ctx.scales, strict=True))
        stand_ins = {}
        for conv, scale in held:
            stand_ins[id(conv)] = conv._held = scale.detach().requires_grad_(True)
        scale_grads: dict[int, torch.Tensor] = {}
        with _frozen_all(blocks), reuse_weights(ctx.scope), _restoring(held):
            for segment in reversed(ctx.segments):
                wants_x = segment.start > 0 or ctx.needs_input_grad[0]
                # the re-run under the forward's autocast state; its backward (the vjp) outside
                # autocast, as any backward pass runs
                with torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache):
                    segment_blocks = blocks[segment.start : segment.stop]
                    rerun, outputs = _rerun_segment(segment_blocks, y, wants_x)
                cotangents = [grad_y, *grad_logdets[segment.start : segment.stop]]
                params = [p for k in segment for p in ctx.params[k]]
                convs = [conv for k in segment for conv in ctx.held[k]]
                leaves = rerun.leaves if wants_x else []
                stand_in = [stand_ins[id(conv)] for conv in convs]
                leaf_grads, grads = _vjp(outputs, cotangents, leaves, params + stand_in)
                if wants_x:
                    grad_y = rerun.join(*leaf_grads)
                param_grads.append(grads[: len(params)])
                for conv, grad in zip(convs, grads[len(params) :], strict=True):
                    scale_grads[id(conv)] = grad
                y = rerun.x
        grad_x = grad_y if ctx.needs_input_grad[0] else None
        flat = [g for segment_grads in reversed(param_grads) for g in segment_grads]
        held_grads = [scale_grads.get(id(conv)) for conv, _ in held]
        return (grad_x, None, None, None, None, None, *flat, *held_grads)


@contextmanager
def _restoring(held: list) -> Iterator[None]:
    """Give each (conv, scale) of `held` its scale back afterwards."""
    try:
        yield
    finally:
        for conv, scale in held:
            conv._held = scale


def _rerun_segment(
    blocks: Sequence[FlowBlock], y: torch.Tensor, input_grad: bool
) -> tuple[Rerun, list[torch.Tensor]]:
    """A segment re-run from its output y: the tail's inverses without autograd, the head's
    `rerun`, then the tail's forward with autograd on the head's re-run output -> (the head's
    Rerun, [the segment's re-run output, one log-det per block])."""
    head, tail = blocks[0], blocks[1:]
    with torch.no_grad():
        for block in reversed(tail):
            y = block.inverse(y)
    rerun = head.rerun(y, input_grad=input_grad)
    h, logdets = rerun.y, [rerun.logdet]
    with torch.enable_grad():
        for block in tail:
            h, logdet = block(h)
            logdets.append(logdet)
    return rerun, [h, *logdets]


def _vjp(
    outputs: list[torch.Tensor],
    cotangents: list[torch.Tensor],
    leaves: list[torch.Tensor],
    params: list[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """One backward call: (∂/∂leaves, ∂/∂params) of Σ <cotangent, output>; zeros for a leaf the
    outputs do not depend on, None for a frozen or unused parameter."""
    pairs = [(out, cot) for out, cot in zip(outputs, cotangents, strict=True) if out.requires_grad]
    trainable = [p for p in params if p.requires_grad]
    inputs = leaves + trainable
    grads: Sequence[torch.Tensor | None] = [None] * len(inputs)
    if pairs and inputs:
        grads = torch.autograd.grad(
            [out for out, _ in pairs], inputs, [cot for _, cot in pairs], allow_unused=True
        )
    leaf_grads = [
        torch.zeros_like(leaf) if grad is None else grad
        for leaf, grad in zip(leaves, grads, strict=False)
    ]
    by_param = dict(zip(map(id, trainable), grads[len(leaves) :], strict=True))
    return leaf_grads, [by_param.get(id(p)) for p in params]
