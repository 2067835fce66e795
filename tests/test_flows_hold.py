"""One optimizer step's normalisation (lipschitz.HeldNormalisation): certified once, used by every
micro-batch, its gradient applied once; and shared between ranks (lipschitz.Share) bit for bit."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from pipeline.flows import ModelConfig, build_flow, lipschitz
from pipeline.flows.lipschitz import LipschitzConv2d, Share
from tests.conftest import count_group_top

MEMORY = ["store", "checkpoint", "invertible"]


def scaled_model(memory: str, seed: int = 0, **keys) -> torch.nn.Module:
    """A float64 certified model whose convs all lie above their budget, so that every scale is
    below 1 and carries a gradient (a scale clamped at 1 would test nothing)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(levels=2, steps=2, width=8, memory=memory, **keys)
    model = build_flow(cfg, (3, 8, 8), 5).double()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64) - 0.5
    model.data_init(x)
    with torch.no_grad():
        for conv in model.modules():
            if isinstance(conv, LipschitzConv2d):
                conv.weight.normal_().mul_(3.0)
    return model


def batches(k: int, size: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.rand(size, 3, 8, 8, generator=g, dtype=torch.float64) - 0.5 for _ in range(k)]


def held_step(model, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of the mean bpd over the micro-batches `xs`, one held normalisation for all."""
    model.zero_grad(set_to_none=True)
    with model.hold_normalisation(len(xs)) as hold:
        for micro, x in enumerate(xs):
            hold.enter(micro)
            (model(x)["bpd"].mean() / len(xs)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def vectors(model) -> list[torch.Tensor]:
    return [c.spectral_vectors.clone() for c in model.modules() if isinstance(c, LipschitzConv2d)]


@pytest.mark.parametrize("memory", MEMORY)
def test_held_micro_batches_give_the_gradient_of_the_whole_batch(memory):
    """k micro-batches under one hold == one pass over their concatenation with the same
    normalisation (float64, to rounding), whatever the memory mode; the scales are below 1."""
    model = scaled_model(memory)
    whole = copy.deepcopy(model)
    xs = batches(3)
    grads = held_step(model, xs)
    expected = held_step(whole, [torch.cat(xs)])
    assert grads.keys() == expected.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    # the scale path carries gradient: every conv is normalised (scale < 1)
    with model.hold_normalisation(1) as hold:
        scales = torch.cat(hold.scales)
    assert (scales < 1).all()


def test_a_held_step_equals_the_unheld_walk_for_one_micro_batch():
    """One micro-batch under a hold is today's training walk, bit for bit: same scales, same
    gradient, the warm-start vectors advanced once."""
    model = scaled_model("store")
    plain = copy.deepcopy(model)
    x = batches(1, size=4)[0]
    grads = held_step(model, [x])
    plain.zero_grad()
    plain(x)["bpd"].mean().backward()
    for name, p in plain.named_parameters():
        assert torch.equal(grads[name], p.grad), name
    for a, b in zip(vectors(model), vectors(plain), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("memory", MEMORY)
def test_kernels_are_the_step_s_and_vectors_advance_once_per_step(memory, monkeypatch):
    model = scaled_model(memory)
    reference = copy.deepcopy(model)
    group_top = lipschitz.group_top  # the real one, for the reference
    calls = count_group_top(monkeypatch)
    convs = [c for c in model.modules() if isinstance(c, LipschitzConv2d)]
    kernels = []
    with model.hold_normalisation(3) as hold:
        for micro, x in enumerate(batches(3)):
            hold.enter(micro)
            model(x)["bpd"].mean().backward()
            kernels.append([conv.effective_weight().detach().clone() for conv in convs])
    assert calls[0] == len(model.normalised_groups())  # once per group and step
    for later in kernels[1:]:
        for a, b in zip(kernels[0], later, strict=True):
            assert torch.equal(a, b)
    # the vectors moved exactly as one group_top per group moves them
    for group in reference.normalised_groups():
        group_top(group, update=True)
    for a, b in zip(vectors(model), vectors(reference), strict=True):
        assert torch.equal(a, b)
    # released: the model normalises itself again
    assert all(conv._held is None for conv in convs)


def held_step_on_ranks(models: list, xs: list[torch.Tensor], units: list, owners: list[int]):
    """`held_step` on each model as on its own rank, the certificates' `units` shared by
    `owners`: one thread per rank, the gather a barrier (as a collective, it waits for every
    rank). Returns each rank's gradients."""
    world = len(models)
    buffers: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(world)
    grads: list[dict | None] = [None] * world

    def rank_step(rank: int) -> None:
        def gather(flat: torch.Tensor) -> torch.Tensor:
            buffers[rank] = flat.clone()
            barrier.wait()
            return torch.stack([buffers[r] for r in range(world)])

        model = models[rank]
        model.zero_grad(set_to_none=True)
        with model.hold_normalisation(len(xs), Share(units, owners, rank, gather)) as hold:
            for micro, x in enumerate(xs):
                hold.enter(micro)
                (model(x)["bpd"].mean() / len(xs)).backward()
        grads[rank] = {n: p.grad.clone() for n, p in model.named_parameters()}

    threads = [threading.Thread(target=rank_step, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(g is not None for g in grads), "a rank failed"
    return grads


@pytest.mark.parametrize("world, sliced", [(2, False), (3, False), (3, True)])
def test_shared_certificates_are_bitwise_the_unshared_ones(world, sliced):
    """`world` ranks, each certifying its units (whole groups, or `sliced` into single convs and
    pairs), one gather: every rank's gradients and warm-start vectors equal the unshared
    computation's bit for bit."""
    base = scaled_model("store")
    xs = batches(2)
    unshared = copy.deepcopy(base)
    expected = held_step(unshared, xs)
    sizes = [len(convs) for convs in base.normalised_groups()]
    units = [(g, 0, size) for g, size in enumerate(sizes)]
    if sliced:
        units = [(g, a, b) for g, size in enumerate(sizes) for a, b in ((0, 1), (1, size))]
    owners = [j % world for j in range(len(units))]
    models = [copy.deepcopy(base) for _ in range(world)]
    for grads, model in zip(held_step_on_ranks(models, xs, units, owners), models, strict=True):
        for name, grad in expected.items():
            assert torch.equal(grads[name], grad), name
        for a, b in zip(vectors(model), vectors(unshared), strict=True):
            assert torch.equal(a, b)
