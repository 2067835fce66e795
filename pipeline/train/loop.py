"""The training loop: build -> resume -> loop {batch -> forward -> backward -> step -> log -> save}.

Builders live in pipeline/train/build.py; this file reads top to bottom.
"""

from __future__ import annotations

import contextlib
import time

import torch

from pipeline import distributed as dist
from pipeline.config import Config, flatten, save_config, to_dict
from pipeline.train import checkpoint
from pipeline.train.build import (
    build_data,
    build_model,
    build_optimizer,
    build_sink,
    initialize_actnorm,
    run_params,
)
from pipeline.train.images import save_grid
from pipeline.train.state import TrainState


def train(cfg: Config) -> dict:
    dist.setup()
    torch.manual_seed(cfg.train.seed)  # same on every rank: identical initial weights
    run_dir, ckpt_root = cfg.run.dir, cfg.run.dir / "checkpoints"
    if dist.is_main():
        save_config(cfg, run_dir / "config.yaml")

    shards, loader, val_loader = build_data(cfg)
    model = build_model(cfg)
    resume_from = checkpoint.find_latest(ckpt_root)
    if resume_from is None:
        initialize_actnorm(model, cfg, shards)  # explicit, identical on all ranks (STYLE.md §9)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    engine, optimizer, scheduler = dist.build_engine(model, optimizer, scheduler, cfg.train)

    state = TrainState()
    if resume_from is not None:
        state, position = checkpoint.load(engine, resume_from)
        loader.load_state_dict(position)
    sink = build_sink(cfg, state)
    state.mlflow_run_id = sink.run_id if dist.is_main() else None
    if resume_from is None:
        sink.log_params({**flatten(to_dict(cfg)), **run_params()})
    say(
        f"{'resumed from ' + str(resume_from) if resume_from else 'fresh start'}; run folder {run_dir}"
    )

    batches = iter(loader)
    images_per_step = cfg.train.micro_batch * cfg.train.grad_accum * dist.world_size()
    t_last, step_last = time.perf_counter(), state.step
    while state.step < cfg.train.steps:
        parts = torch.zeros(3)  # bpd, logpz_bpd, logdet_bpd summed over micro-batches
        for _ in range(cfg.train.grad_accum):
            x = next(batches).to(engine.device)
            with autocast(cfg):
                out = engine(x)
            loss = out["bpd"].mean()
            engine.backward(loss)
            engine.step()
            parts += torch.stack([loss.detach(), *bpd_parts(out, x)]).float().cpu()
        state.step += 1
        state.samples += images_per_step
        state.epoch = loader.epoch

        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            parts = dist.all_reduce(parts) / (cfg.train.grad_accum * dist.world_size())
            now = time.perf_counter()
            speed = (state.step - step_last) * images_per_step / (now - t_last)
            t_last, step_last = now, state.step
            metrics = {
                "train/bpd": parts[0].item(),
                "train/logpz_bpd": parts[1].item(),
                "train/logdet_bpd": parts[2].item(),
                "optim/lr": scheduler.get_last_lr()[0],
                "speed/images_per_s": speed,
            }
            sink.log(state.step, metrics)
            say(
                f"step {state.step:>6}/{cfg.train.steps}  bpd {metrics['train/bpd']:.4f}  "
                f"lr {metrics['optim/lr']:.2e}  {speed:.1f} img/s"
            )
        if cfg.train.val_every and state.step % cfg.train.val_every == 0:
            sink.log(state.step, {"val/bpd": validate(engine, val_loader, cfg)})
        if state.step % cfg.train.save_every == 0 or state.step == cfg.train.steps:
            checkpoint.save(engine, state, cfg, ckpt_root, cfg.train.keep_last, loader.state_dict())

    val_bpd = validate(engine, val_loader, cfg)
    sink.log(state.step, {"val/bpd": val_bpd})
    samples_png = run_dir / "samples.png"
    if dist.is_main():
        with torch.no_grad():
            x = model.sample(cfg.train.samples, temperature=cfg.train.temperature)
        save_grid(x, samples_png)
        sink.log_artifact(samples_png)
        sink.log_artifact(run_dir / "config.yaml")
    summary = {
        "final_val_bpd": val_bpd,
        "steps": state.step,
        "run_dir": str(run_dir.resolve()),
        "samples": str(samples_png.resolve()),
        "tracking_uri": sink.uri,
        "mlflow_run_id": sink.run_id,
        "checkpoint": str(checkpoint.find_latest(ckpt_root)),
    }
    sink.close()
    dist.teardown()
    return summary


def bpd_parts(out: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss split into prior and volume terms, in bits/dim: bpd = -(logpz + logdet)/(D ln2) + n."""
    scale = x[0].numel() * torch.log(torch.tensor(2.0))
    return (-out["logpz"].mean() / scale).detach(), (-out["logdet"].mean() / scale).detach()


@torch.no_grad()
def validate(engine, val_loader, cfg: Config) -> float:
    """Mean bpd over the val split, every rank its share, reduced: [sum of bpd, count]."""
    engine.eval()
    acc = torch.zeros(2, dtype=torch.float64)
    for i, x in enumerate(val_loader):
        if cfg.train.val_batches and i >= cfg.train.val_batches:
            break
        with autocast(cfg):
            bpd = engine(x.to(engine.device))["bpd"]
        acc += torch.tensor([bpd.double().sum().item(), bpd.numel()], dtype=torch.float64)
    engine.train()
    acc = dist.all_reduce(acc)
    return (acc[0] / acc[1].clamp(min=1)).item()


def autocast(cfg: Config):
    if cfg.train.precision == "bf16":
        return torch.autocast(dist.device().type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def say(msg: str) -> None:
    if dist.is_main():
        print(msg, flush=True)
