"""One optimizer step's mechanics: forward/backward over the micro-batches -> skip or step (one
decision on every rank) -> the step's metrics; and validation, the engine's other pass."""

from __future__ import annotations

import contextlib
import math

import torch

from pipeline import distributed as dist
from pipeline.theory.diagnostics import grad_norms
from pipeline.train import faults
from pipeline.train.config import TrainConfig


def train_step(run, batches) -> tuple[dict, bool, torch.Tensor]:
    """One optimizer step over grad_accum micro-batches; advances ``run.state``. Returns (metrics,
    SIGTERM seen on any rank, the last micro-batch)."""
    state = run.state
    sums, extremes, x = forward_backward(run, batches)
    lr = run.engine.get_lr()[0]  # the LR this step applies
    bounds = certified_range(run.model, x[0].numel())  # of the weights the batch went through
    means, extremes, norms, skipped, counts = skip_or_step(run, sums, extremes)
    faults.maybe_damage_prior(run.cfg.faults, run.model, state.step + 1)
    state.skipped_steps += int(skipped)
    state.step += 1
    state.samples += run.cfg.train.micro_batch * run.cfg.train.grad_accum * dist.world_size()
    state.epoch = run.loader.epoch
    metrics = step_metrics(means, extremes, norms, skipped, lr, bounds)
    metrics["data/bad_samples"] = counts[1].item()  # skipped by the stream, all ranks so far
    if state.optimum_bpd is not None:
        metrics["theory/optimum_bpd"] = state.optimum_bpd
        metrics["theory/gap_bpd"] = metrics["train/bpd"] - state.optimum_bpd
    return metrics, bool(counts[0] > 0), x


def forward_backward(run, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward over the micro-batches of one step, under one held normalisation
    (train/certificate.py: certified once per step, its gradient applied in the last backward,
    before DeepSpeed reduces at the accumulation boundary). Returns this rank's sums of [bpd,
    logpz_bpd, logdet_bpd], its extremes [max, -min] of log|det J|/D (kept on the device and
    copied to the host once) and the last batch."""
    engine, cfg, step = run.engine, run.cfg, run.state.step + 1
    accum = cfg.train.grad_accum
    sums = torch.zeros(3, dtype=torch.float64, device=engine.device)
    extremes = torch.full((2,), -math.inf, dtype=torch.float64, device=engine.device)
    with run.certificate.hold(accum) as hold:
        for micro in range(accum):
            x = faults.corrupt_batch(cfg.faults, next(batches), step).to(engine.device)
            hold.enter(micro)
            with autocast(cfg.train.precision):
                out = engine(x)
            loss = out["bpd"].float().mean()
            engine.backward(loss)
            bits = x[0].numel() * math.log(2.0)
            terms = [loss, -out["logpz"].mean() / bits, -out["logdet"].mean() / bits]
            sums += torch.stack(terms).detach().double()
            logdet = out["logdet"].detach().double() / x[0].numel()
            extremes = torch.maximum(extremes, torch.stack([logdet.max(), -logdet.min()]))
            if micro < accum - 1:
                engine.step()  # not a boundary: DeepSpeed only counts the micro-step
    host = torch.cat([sums, extremes]).cpu()  # the step's one transfer
    return host[:3], host[3:], x


def skip_or_step(run, sums: torch.Tensor, extremes: torch.Tensor):
    """The optimizer step, or a skip on every rank if anything is non-finite on any rank.

    The loss terms (with the SIGTERM flag and the stream's bad-sample count riding along) are
    all-reduced after the last backward and before the step, so every rank sees the same numbers
    and takes the same decision. A skip cancels the optimizer's step (SkippableAdamW), which leaves
    weights and Adam moments untouched at every ZeRO stage; at ZeRO 1/2 DeepSpeed's own overflow
    check also refuses non-finite gradients. Returns (mean loss terms, extremes, gradient norms,
    skipped, [ranks that saw SIGTERM, bad samples of all ranks]).
    """
    engine, train_cfg = run.engine, run.cfg.train
    flags = [float(run.preemption.requested), float(sum(run.loader.bad_samples.values()))]
    reduced = dist.all_reduce(torch.cat([sums, torch.tensor(flags, dtype=torch.float64)]))
    means = reduced[:3] / (train_cfg.grad_accum * dist.world_size())
    extremes = dist.all_reduce(extremes, "max")
    norms = grad_norms(engine.module.named_parameters()) if train_cfg.zero_stage == 0 else {}
    skip = run.guard.skips(means, norms.get("global", 0.0))
    run.optimizer.skip_next = skip
    engine.step()
    if train_cfg.zero_stage > 0:
        norms = {"global": float(engine.get_global_grad_norm() or math.nan)}
        skip = skip or not engine.was_step_applied()
    return means, extremes, norms, skip, reduced[3:]


def step_metrics(means, extremes, norms: dict, skipped: bool, lr: float, bounds: dict) -> dict:
    """The step's metrics; the only producer of train/*, optim/* and stability/logdet_*_per_dim
    (the batch's extremes, which the detector holds to the certified range)."""
    return {
        "train/bpd": means[0].item(),
        "train/logpz_bpd": means[1].item(),
        "train/logdet_bpd": means[2].item(),
        "optim/lr": lr,
        "optim/grad_norm": norms["global"],
        "optim/skipped": float(skipped),
        "stability/logdet_max_per_dim": extremes[0].item(),
        "stability/logdet_min_per_dim": -extremes[1].item(),
        **bounds,
        **{f"optim/grad_norm/{k}": v for k, v in norms.items() if k != "global"},
    }


def certified_range(model, num_dims: int) -> dict:
    """The certified per-dim range of log|det J| from the current parameters (cheap: no data)."""
    lo, hi = model.logdet_bound()
    return {"lipschitz/logdet_lower": lo / num_dims, "lipschitz/logdet_upper": hi / num_dims}


@torch.no_grad()
def validate(engine, val_loader, train: TrainConfig) -> float:
    """Mean bpd over the val split, every rank its share, reduced: [sum of bpd, count]."""
    engine.eval()
    acc = torch.zeros(2, dtype=torch.float64)
    for i, x in enumerate(val_loader):
        if train.val_batches and i >= train.val_batches:
            break
        with autocast(train.precision):
            bpd = engine(x.to(engine.device))["bpd"].double()
        acc += torch.stack([bpd.sum(), torch.tensor(bpd.numel(), dtype=torch.float64)]).cpu()
    engine.train()
    acc = dist.all_reduce(acc)
    return (acc[0] / acc[1].clamp(min=1)).item()


def autocast(precision: str):
    """bf16: subnets under torch.autocast; log-dets, prior and loss stay fp32 (docs/design.md §3.5 (6))."""
    if precision == "bf16":
        return torch.autocast(dist.device().type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
