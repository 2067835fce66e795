"""Data-parallel scaling, 1 vs 2 ranks: `python -m pipeline bench scaling [options]`.

Two measurements per rank count (weak scaling: the per-rank micro-batch is fixed), printed as JSON:

  train   the real thing: `launch/local.sh` (the DeepSpeed launcher, gloo on CPU) runs
          `python -m pipeline train` for --steps steps; images/s is the loop's own
          speed/images_per_s from the run's metrics.jsonl (all ranks' images per second of wall
          time, whole steps: data, forward, backward, guard, optimizer), the first log interval
          (start-up) left out; the best and the median interval are reported.
  comm    a dedicated DeepSpeed worker (this file, --worker, under the same launcher) times
          training steps (engine forward, backward, step on a fixed batch) two ways:
          - instrumented: wall time inside the engine's gradient all-reduce
            (engine.allreduce_gradients, wrapped with a timer), as a share of the step;
          - ablation: steps with the all-reduce switched off (engine.enable_backward_allreduce =
            False), so that 1 - t_without / t_with is the share the all-reduce costs.
          - transfer: one all-reduce of a flat tensor of the gradients' size, both ranks
            released together by a barrier, as a share of the step (the wire cost alone).
          Time in the engine's all-reduce includes waiting for the slower rank, so it measures
          communication plus imbalance. Steps alternate with and without; the best of each counts.

Ports come from 29800-29899. With 2 CPU cores shared by 2 ranks (one thread each) the 2-rank
numbers also pay for contention, not only communication.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.bench.common import ROOT, emit, machine
from pipeline.distributed import free_port

PORTS = range(29800, 29900)  # rendezvous ports of the launches
QUIET_RUN = [
    "tracking.enabled=false",
    "train.optimum_images=0",
    "train.samples=4",
    "train.val_batches=1",
    "train.save_every=1000000",
    "guard.diagnostics_every=0",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/debug.yaml")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--steps", type=int, default=30, help="training steps of the real run")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--comm-steps", type=int, default=8, help="timed step pairs per round (worker)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of --comm-steps step pairs")
    p.add_argument("--skip-train", action="store_true", help="only the comm measurement")
    p.add_argument("overrides", nargs="*", help="config overrides for both, e.g. model.width=32")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)


def env(nproc: int, port: int) -> dict:
    e = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        e.pop(key, None)
    e.update(
        NPROC=str(nproc),
        MASTER_PORT=str(port),
        PYTHON=sys.executable,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",  # a rank that aborts prints where it was
    )
    return e


def tail(out: subprocess.CompletedProcess) -> str:
    return out.stdout[-1500:] + out.stderr[-1500:]


def real_run(args, nproc: int, tmp: Path) -> dict:
    run_root = tmp / f"runs{nproc}"
    cmd = [
        str(ROOT / "launch" / "local.sh"), "--config", args.config,
        f"run.root={run_root}", f"data.cache={tmp}/data", f"train.steps={args.steps}",
        f"train.log_every={args.log_every}", *QUIET_RUN, *args.overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    out = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env(nproc, free_port(PORTS)),
        timeout=1800,
        check=False,
    )
    wall = time.perf_counter() - start
    if out.returncode != 0:
        return {"ranks": nproc, "error": tail(out)}
    (metrics,) = run_root.glob("*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    speeds = [r["speed/images_per_s"] for r in rows if "speed/images_per_s" in r][1:]
    return {
        "ranks": nproc,
        "images_per_s_best": round(max(speeds), 2),
        "images_per_s_median": round(statistics.median(speeds), 2),
        "intervals": len(speeds),
        "launch_to_exit_s": round(wall, 1),
    }


def comm_workers(args, nproc: int, out_dir: Path) -> tuple[list[dict], dict]:
    """Launch the comm workers; their results, and what went wrong ({} when nothing did).

    A launch whose ranks all wrote their results but whose exit was not clean (a rank aborted while
    the process group was being torn down) still measured; the exit is reported, not hidden. A
    launch that lost a result is retried once on a fresh port, and the first failure reported.
    """
    problems: dict = {}
    for attempt in (1, 2):
        for stale in out_dir.glob("rank*.json"):
            stale.unlink()
        cmd = [
            sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(free_port(PORTS)), "--no_local_rank",
            "--module", "pipeline", "bench", "scaling", "--worker", "--out", str(out_dir),
            "--config", args.config, "--comm-steps", str(args.comm_steps),
            "--rounds", str(args.rounds), *args.overrides,
        ]  # fmt: skip
        out = subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env(nproc, 0),
            timeout=1800,
            check=False,
        )
        ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
        if len(ranks) == nproc:
            if out.returncode != 0:
                problems["unclean_exit"] = f"return code {out.returncode}: {tail(out)}"
            return ranks, problems
        problems[f"attempt_{attempt}_failed"] = tail(out)
    return [], problems


def comm_run(args, nproc: int, tmp: Path) -> dict:
    out_dir = tmp / f"comm{nproc}"
    out_dir.mkdir()
    ranks, problems = comm_workers(args, nproc, out_dir)
    if not ranks:
        return {"ranks": nproc, "error": problems}
    with_s = max(r["step_s_with"] for r in ranks)  # a step lasts as long as its slowest rank
    without_s = max(r["step_s_without"] for r in ranks)
    allreduce_s = max(r["allreduce_s"] for r in ranks)
    transfer_s = max(r["transfer_s"] for r in ranks)
    return {
        "ranks": nproc,
        "micro_batch": ranks[0]["micro_batch"],
        "grad_bytes": ranks[0]["grad_bytes"],
        "step_s": round(with_s, 5),
        "step_s_without_allreduce": round(without_s, 5),
        "allreduce_s": round(allreduce_s, 5),
        "comm_share_instrumented": round(allreduce_s / with_s, 4),
        "comm_share_ablation": round(max(0.0, 1 - without_s / with_s), 4),
        "flat_allreduce_s": round(transfer_s, 6),
        "comm_share_transfer": round(transfer_s / with_s, 4),
        "images_per_s": round(nproc * ranks[0]["micro_batch"] / with_s, 2),
        **problems,
    }


def worker(args) -> None:
    """One rank: fixed batch, engine steps with and without the gradient all-reduce."""
    import torch

    from pipeline import distributed as dist
    from pipeline.config import load_config
    from pipeline.data.quantise import dequantise
    from pipeline.train.run import build_model, build_optimizer
    from pipeline.train.state import TrainState

    torch.set_num_threads(1)
    dist.setup()
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    r, n = cfg.data.resolution, cfg.data.n_bits
    g = torch.Generator().manual_seed(dist.rank())
    k = torch.randint(0, 2**n, (cfg.train.micro_batch, 3, r, r), generator=g)
    x = dequantise(k, n, 0.5)  # the bin midpoints
    model.data_init(x)
    optimizer, scheduler = build_optimizer(model, cfg.train, cfg.faults, TrainState())
    engine, _, _ = dist.build_engine(model, optimizer, scheduler, cfg.train)
    reduce, spent = engine.allreduce_gradients, [0.0]

    def timed_reduce(*a, **k):
        start = time.perf_counter()
        try:
            return reduce(*a, **k)
        finally:
            spent[0] += time.perf_counter() - start

    engine.allreduce_gradients = timed_reduce

    def step(allreduce: bool) -> tuple[float, float]:
        engine.enable_backward_allreduce = allreduce
        spent[0] = 0.0
        start = time.perf_counter()
        loss = engine(x)["bpd"].mean()
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - start, spent[0]

    for _ in range(2):  # warm-up
        step(True)
    dist.barrier()
    # steps alternate with and without the all-reduce (the same schedule on every rank), so that
    # load from elsewhere drifts across both alike; the best of each counts
    with_s, without_s, allreduce_s = float("inf"), float("inf"), 0.0
    for i in range(2 * args.rounds * args.comm_steps):
        elapsed, reduce_s = step(allreduce=i % 2 == 0)
        if i % 2 == 0 and elapsed < with_s:
            with_s, allreduce_s = elapsed, reduce_s
        elif i % 2 == 1:
            without_s = min(without_s, elapsed)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # the transfer alone: one flat all-reduce of the gradients' size, both ranks entering together
    flat, transfer_s = torch.zeros(grad_bytes // 4), float("inf")
    for _ in range(20):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat)
        transfer_s = min(transfer_s, time.perf_counter() - start)
    result = {
        "rank": dist.rank(),
        "micro_batch": cfg.train.micro_batch,
        "grad_bytes": grad_bytes,
        "step_s_with": with_s,
        "step_s_without": without_s,
        "allreduce_s": allreduce_s,
        "transfer_s": transfer_s,
    }
    Path(args.out, f"rank{dist.rank()}.json").write_text(json.dumps(result))
    dist.teardown()


def run(args: argparse.Namespace) -> int:
    if args.worker:
        worker(args)
        return 0
    ranks = [int(v) for v in args.ranks.split(",")]
    result: dict = {"machine": machine(1), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="lipflow-bench-scaling-") as tmp:
        if not args.skip_train:
            result["train"] = [real_run(args, n, Path(tmp)) for n in ranks]
        result["comm"] = [comm_run(args, n, Path(tmp)) for n in ranks]
    for key in ("train", "comm"):
        rows = {row["ranks"]: row for row in result.get(key, []) if "error" not in row}
        if 1 in rows and 2 in rows:
            speed = "images_per_s_best" if key == "train" else "images_per_s"
            result[f"{key}_speedup_2_vs_1"] = round(rows[2][speed] / rows[1][speed], 3)
    result["load_avg_after"] = machine(1)["load_avg_1_5_15"]
    emit(result)
    return 0
