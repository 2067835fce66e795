"""lipflow against normflows, side by side: `python -m pipeline bench peer [options]`.

One training step (forward to the loss, backward, AdamW step, fp32, the same batch every step) of
each arm, all arms in this one process, interleaved: a warm-up, then --rounds rounds in which every
arm runs --steps steps, the order rotating each round so that no arm always follows the same one.
Slow phases of a shared machine then hit every arm alike; the median step counts.

Arms (``--arms``, comma-separated ``preset`` or ``preset:memory``; ``all`` = every preset x mode):
    normflows   normflows' multi-scale Glow, built as its Glow example does (GlowBlock x K per
                level, Squeeze, Merge, DiagGaussian bases, MultiscaleFlow), loss forward_kld
    glow        the model section's glow preset, unconstrained Glow (pipeline/flows/config.py;
                matched to normflows' GlowBlock block for block)
    default     ModelConfig's defaults, whatever they are when the bench runs (JSON: model_keys)
    sqrtk       the default with spectral_method=exact: each conv normalised by the looser
                certified bound sqrt(k_h·k_w)·‖W_mat‖₂ instead of its symbol's norm
    unnormalised  the default's blocks without spectral normalisation (not certified: it
                separates what the normalisation costs from what the blocks cost)
    bounded     the model section's bounded preset: bounded blocks, not certified
and memory modes store (if none is named), checkpoint, invertible; a `+compile` suffix
(`glow+compile`) compiles the model as train.compile does (give --warmup ≥ 2: the first steps compile). Architectures match normflows 1.7.3
(pinned dev dependency, imported only here): L levels x K steps of actnorm, 1x1 conv, affine coupling
whose subnet is conv3x3 - ReLU - conv1x1 - ReLU - conv3x3 with `width` hidden channels; lipflow's
split priors are learned and conditional, normflows' bases are unconditional (parameters reported).

Settings (``--settings``): 32 (32², L3 K8 w128, batch 16, 1 thread), 64 (64², L4 K8 w128, batch 8,
2 threads), 128 (128², L5 K8 w128, batch 4, 2 threads), pub64 and pub128 (configs/celebahq-256's
architecture, L6 K32 w512, and its per-GPU batch 4, at 64² and 128²), quick (16², L2 K2 w16,
batch 4: the test). Start-up (build, first step, warm-up) is reported apart from the steady state.
``--ranks 1,2 [--accum 1,4]`` instead trains each lipflow arm with the real trainer under
launch/local.sh (gloo, one thread a rank, the batch per rank), interleaved by rounds.
Per arm: median step time, images/s, ratio to normflows (images/s over normflows' images/s; and
the same from median CPU time, which other jobs on a shared machine inflate least), the spread of
round medians (min/max), parameters; per setting, the speed goals as ratios (wall and CPU).
``--profile ARM[,ARM]`` instead runs torch.profiler over a few steps of each named arm at each
setting and lists the top ops.

    python -m pipeline bench peer                                    # the default arms, 32-128²
    python -m pipeline bench peer --settings 32 --arms default --profile default,glow
    python -m pipeline bench peer --out peer.json     # peer.json rewritten after each setting
    python -m pipeline bench peer --split --settings 32,64,128   # the normalisation's parts
    python -m pipeline bench peer --settings 32,64 --arms glow,default --ranks 1,2 --accum 1,4
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.bench.common import ROOT, emit, machine
from pipeline.errors import PipelineError
from pipeline.flows import ModelConfig, build_flow
from pipeline.flows.config import PRESETS as MODEL_PRESETS
from pipeline.io import atomic_write_text

N_BITS = 8
NORMFLOWS = "normflows"
PRESETS: dict[str, dict] = {
    "glow": MODEL_PRESETS["glow"],
    "default": MODEL_PRESETS["certified"],
    "sqrtk": {"spectral_method": "exact"},  # the default, normalised by sqrt(k_h·k_w)·‖W_mat‖₂
    "unnormalised": {"spectral_norm": False},  # the default's blocks, no spectral norm
    "bounded": MODEL_PRESETS["bounded"],
}
MODES = ("store", "checkpoint", "invertible")
DEFAULT_ARMS = "normflows,glow,default,bounded,default:checkpoint,default:invertible"


@dataclass(frozen=True)
class Setting:
    resolution: int
    levels: int
    steps: int  # K, flow steps per level
    width: int
    batch: int
    threads: int


SETTINGS = {
    "32": Setting(32, 3, 8, 128, 16, 1),
    "64": Setting(64, 4, 8, 128, 8, 2),
    "128": Setting(128, 5, 8, 128, 4, 2),
    # configs/celebahq-256.yaml's architecture (6 levels x 32 steps, width 512) and per-GPU batch,
    # at reduced resolution: where large flows train
    "pub64": Setting(64, 6, 32, 512, 4, 2),
    "pub128": Setting(128, 6, 32, 512, 4, 2),
    "quick": Setting(16, 2, 2, 16, 4, 1),
}


@dataclass
class Arm:
    name: str
    step: Callable[[], None]
    params: int
    model_keys: dict | None = None  # lipflow arms: the resolved ModelConfig
    times: list[float] = dataclasses.field(default_factory=list)
    cpu_times: list[float] = dataclasses.field(default_factory=list)
    round_medians: list[float] = dataclasses.field(default_factory=list)
    build_s: float = 0.0  # start-up: building the model, its data init and the optimizer
    first_step_s: float = 0.0  # start-up: the first step (cold normalisers, a +compile compiles)
    warmup_s: float = 0.0  # wall time of all the warm-up steps, the first included


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", default="32,64,128", help=f"of {', '.join(SETTINGS)}")
    p.add_argument("--arms", default=DEFAULT_ARMS, help="preset[:memory],...; all: every pair")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first")
    p.add_argument("--threads", type=int, help="override every setting's torch threads")
    p.add_argument("--batch", type=int, help="override every setting's batch size")
    p.add_argument(
        "--levels",
        type=int,
        help="override every setting's levels (the same architecture at every resolution)",
    )
    p.add_argument("--quick", action="store_true", help="the tiny setting, 2 rounds of 1 step")
    p.add_argument("--profile", help="arms to profile (torch.profiler) instead of timing")
    p.add_argument(
        "--split",
        action="store_true",
        help="instead of timing arms: the certified default's normalisation, part by part",
    )
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument(
        "--probe-steps",
        type=int,
        default=0,
        help="--split: also train the model this many AdamW steps (--probe-lr) and count which "
        "certificate rung served each normalisation",
    )
    p.add_argument("--probe-lr", type=float, default=1e-3)
    p.add_argument(
        "--ranks",
        help="instead of one process: the real trainer (launch/local.sh, gloo, one thread a "
        "rank) at these rank counts, e.g. 1,2; the batch is per rank",
    )
    p.add_argument("--accum", default="1", help="--ranks: train.grad_accum values, e.g. 1,4")
    p.add_argument("--train-steps", type=int, default=12, help="--ranks: steps per training run")
    p.add_argument(
        "--out", help="also write the JSON here, rewritten after each setting (partial results)"
    )


def arm_names(text: str) -> list[str]:
    if text == "all":
        return [NORMFLOWS] + [f"{p}:{m}" if m != "store" else p for p in PRESETS for m in MODES]
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        preset, mode, _ = parse_arm(name)
        if name != NORMFLOWS and (preset not in PRESETS or mode not in MODES):
            raise PipelineError(
                f"unknown arm {name!r}: use normflows or preset[:memory][+compile] with preset in "
                f"{', '.join(PRESETS)} and memory in {', '.join(MODES)}"
            )
    return names


def parse_arm(name: str) -> tuple[str, str, bool]:
    """'glow:invertible+compile' -> ('glow', 'invertible', True); memory defaults to store."""
    name, plus, rest = name.partition("+")
    preset, _, mode = name.partition(":")
    return preset, mode or "store", bool(plus) and rest == "compile"


def resolve(setting: str, args: argparse.Namespace, threads: int | None = None):
    """The named setting with --batch and --levels applied, and the torch threads it runs on (set here):
    --threads, else `threads`, else the setting's."""
    base = SETTINGS[setting]
    s = dataclasses.replace(
        base, batch=args.batch or base.batch, levels=getattr(args, "levels", None) or base.levels
    )
    threads = args.threads or threads or s.threads
    torch.set_num_threads(threads)
    return s, threads


# ----- the two libraries' models -----------------------------------------------------------------
def batch(s: Setting) -> torch.Tensor:
    """Dequantised n-bit images in lipflow's domain [-1/2, 1/2); both libraries get the same one."""
    n = 2**N_BITS
    shape = (s.batch, 3, s.resolution, s.resolution)
    k = torch.randint(0, n, shape, generator=torch.Generator().manual_seed(1))
    return (k + torch.rand(shape, generator=torch.Generator().manual_seed(2))) / n - 0.5


def import_normflows():
    try:
        import normflows
    except ImportError as error:
        raise PipelineError(
            "bench peer needs normflows (a pinned dev dependency), which is not installed: "
            "`make setup`, or pip install -c requirements.lock -e '.[dev]'"
        ) from error
    return normflows


def normflows_glow(s: Setting) -> torch.nn.Module:
    """normflows' multi-scale Glow as in its examples/glow.ipynb (without class conditioning).
    normflows lists levels from the coarsest: level i runs at 2^(L-i) downsampling."""
    nf = import_normflows()
    big_l, r = s.levels, s.resolution
    q0, merges, flows = [], [], []
    for i in range(big_l):
        channels = 3 * 2 ** (big_l + 1 - i)
        level = [
            nf.flows.GlowBlock(channels, s.width, split_mode="channel", scale=True)
            for _ in range(s.steps)
        ]
        flows.append([*level, nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (3 * 2 ** (big_l - i), r // 2 ** (big_l - i), r // 2 ** (big_l - i))
        else:
            latent = (3 * 2 ** (big_l + 1), r // 2**big_l, r // 2**big_l)
        q0.append(nf.distributions.DiagGaussian(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def lipflow_model(name: str, s: Setting) -> tuple[torch.nn.Module, ModelConfig]:
    preset, mode, _ = parse_arm(name)
    cfg = ModelConfig(levels=s.levels, steps=s.steps, width=s.width, memory=mode, **PRESETS[preset])
    return build_flow(cfg, (3, s.resolution, s.resolution), N_BITS), cfg


def build_arm(name: str, s: Setting, x: torch.Tensor) -> Arm:
    start = time.perf_counter()
    arm = make_arm(name, s, x)
    arm.build_s = time.perf_counter() - start
    return arm


def make_arm(name: str, s: Setting, x: torch.Tensor) -> Arm:
    torch.manual_seed(0)
    if name == NORMFLOWS:
        model = normflows_glow(s)
        with torch.no_grad():
            model.forward_kld(x)  # normflows initialises its ActNorms on the first batch

        def loss() -> torch.Tensor:
            return model.forward_kld(x)

        keys = None
    else:
        model, cfg = lipflow_model(name, s)
        model.data_init(x)
        if parse_arm(name)[2]:
            model.compile(dynamic=False)  # as train.compile does; the warm-up steps compile

        def loss() -> torch.Tensor:
            return model(x)["bpd"].mean()

        keys = dataclasses.asdict(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return Arm(name, step, sum(p.numel() for p in model.parameters()), keys)


# ----- timing ------------------------------------------------------------------------------------
def timed(arm: Arm, steps: int) -> None:
    times = []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        arm.step()
        times.append(time.perf_counter() - start)
        arm.cpu_times.append(time.process_time() - cpu_start)
    arm.times += times
    arm.round_medians.append(statistics.median(times))


def compare(setting: str, names: list[str], args: argparse.Namespace) -> dict:
    s, threads = resolve(setting, args)
    x = batch(s)
    arms = [build_arm(name, s, x) for name in names]
    for arm in arms:
        start = time.perf_counter()
        for i in range(args.warmup):
            arm.step()
            if i == 0:
                arm.first_step_s = time.perf_counter() - start
        arm.warmup_s = time.perf_counter() - start
    load_before = machine(threads)["load_avg_1_5_15"]
    for r in range(args.rounds):
        for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:
            timed(arm, args.steps)
    rows = {arm.name: row(arm, s.batch) for arm in arms}
    print(f"bench peer: setting {setting} done ({len(arms)} arms)", file=sys.stderr, flush=True)
    if NORMFLOWS in rows:
        base = rows[NORMFLOWS]
        for r in rows.values():
            r["ratio_to_normflows"] = round(r["images_per_s"] / base["images_per_s"], 3)
            r["ratio_to_normflows_cpu"] = round(
                base["step_cpu_s_median"] / r["step_cpu_s_median"], 3
            )
    return {
        "setting": {"name": setting, **dataclasses.asdict(s), "threads": threads},
        "machine": {**machine(threads), "load_avg_before": load_before},
        "arms": rows,
        "goals": goals(rows, "step_s_median"),
        "goals_cpu": goals(rows, "step_cpu_s_median"),
    }


def row(arm: Arm, batch_size: int) -> dict:
    median = statistics.median(arm.times)
    out = {
        # steady state: the timed steps, after the warm-up
        "step_s_median": round(median, 5),
        "images_per_s": round(batch_size / median, 3),
        "round_median_min_s": round(min(arm.round_medians), 5),
        "round_median_max_s": round(max(arm.round_medians), 5),
        "step_cpu_s_median": round(statistics.median(arm.cpu_times), 5),
        "timed_steps": len(arm.times),
        # start-up, apart: building (model, data init, optimizer), the first step, the warm-up
        "start_up": {
            "build_s": round(arm.build_s, 3),
            "first_step_s": round(arm.first_step_s, 3),
            "warmup_s": round(arm.warmup_s, 3),
        },
        "params": arm.params,
    }
    if arm.model_keys is not None:
        out["model_keys"] = arm.model_keys
    return out


def goals(rows: dict, time_key: str) -> dict:
    """The speed goals (each key names its threshold) as speed ratios (inverse ratios of the median step times under `time_key`:
    wall or CPU), each present only when both arms ran."""
    pairs = {
        "default_vs_normflows (goal >= 1.3)": ("default", NORMFLOWS),
        "glow_vs_normflows (goal >= 1.5)": ("glow", NORMFLOWS),
        "glow_compiled_vs_normflows": ("glow+compile", NORMFLOWS),
        "default_vs_glow (goal >= 0.9: certified within 10% of uncertified)": ("default", "glow"),
        "default_vs_bounded": ("default", "bounded"),
        "invertible_vs_store (goal >= 0.8)": ("default:invertible", "default"),
        "checkpoint_vs_store": ("default:checkpoint", "default"),
    }
    return {
        key: round(rows[b][time_key] / rows[a][time_key], 3)
        for key, (a, b) in pairs.items()
        if a in rows and b in rows
    }


# ----- the real trainer, 1 or more ranks --------------------------------------------------------
def launched(setting: str, names: list[str], args: argparse.Namespace) -> dict:
    """Each lipflow arm trained by `python -m pipeline train` under launch/local.sh (synthetic data
    at the setting's resolution, tracking off, no saves), at every rank count and grad_accum;
    interleaved: every round runs each combination once, in rotating order. Steady state: the
    loop's own speed/images_per_s (all ranks' images per second of whole steps), median over the
    log intervals after the first; start-up: launch to the first step's metrics row."""
    from pipeline.bench.scaling import PORTS, QUIET_RUN, env, tail
    from pipeline.distributed import free_port

    s, _ = resolve(setting, args)
    ranks = [int(v) for v in args.ranks.split(",")]
    accums = [int(v) for v in args.accum.split(",")]
    combos = [(n, r, a) for n in names if n != NORMFLOWS for r in ranks for a in accums]
    runs: dict[tuple, list[dict]] = {c: [] for c in combos}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for name, nproc, accum in combos[k % len(combos) :] + combos[: k % len(combos)]:
                preset, mode, compiled = parse_arm(name)
                root = Path(tmp) / f"r{k}-{preset}-{mode}-{nproc}-{accum}"
                cmd = [
                    str(ROOT / "launch" / "local.sh"), "--config", "configs/debug.yaml",
                    f"run.root={root}", f"data.cache={tmp}/data", f"data.resolution={s.resolution}",
                    f"data.synthetic_train={max(256, 4 * s.batch * nproc * accum)}",
                    f"model.preset={'certified' if preset == 'default' else preset}",
                    f"model.levels={s.levels}", f"model.steps={s.steps}", f"model.width={s.width}",
                    f"model.memory={mode}", f"train.compile={str(compiled).lower()}",
                    f"train.micro_batch={s.batch}", f"train.grad_accum={accum}",
                    f"train.steps={args.train_steps}", "train.log_every=1", "train.init_batches=1",
                    "guard.battery_images=0", "guard.allow_damaged=true", *QUIET_RUN,
                ]  # fmt: skip
                start = time.time()
                out = subprocess.run(
                    cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600, check=False,
                    env=env(nproc, free_port(PORTS)),
                )  # fmt: skip
                if out.returncode != 0:
                    raise PipelineError(f"bench peer --ranks: {name} on {nproc} failed:\n{tail(out)}")
                (metrics,) = root.glob("*/metrics.jsonl")
                rows = [json.loads(line) for line in metrics.read_text().splitlines()]
                rows = [r for r in rows if "speed/images_per_s" in r]
                runs[(name, nproc, accum)].append(
                    {
                        "images_per_s": statistics.median(r["speed/images_per_s"] for r in rows[1:]),
                        "start_up_s": rows[0]["time"] - start,
                    }
                )
                print(f"bench peer: {name} ranks {nproc} accum {accum} round {k}", file=sys.stderr)
    table = {}
    for (name, nproc, accum), results in runs.items():
        speeds = [r["images_per_s"] for r in results]
        table[f"{name} ranks={nproc} accum={accum}"] = {
            "images_per_s_median": round(statistics.median(speeds), 3),
            "images_per_s_min": round(min(speeds), 3),
            "images_per_s_max": round(max(speeds), 3),
            "start_up_s_median": round(statistics.median(r["start_up_s"] for r in results), 1),
        }
    ratios = {
        f"default_vs_glow ranks={r} accum={a}": round(
            table[f"default ranks={r} accum={a}"]["images_per_s_median"]
            / table[f"glow ranks={r} accum={a}"]["images_per_s_median"],
            3,
        )
        for r in ranks
        for a in accums
        if "default" in names and "glow" in names
    }
    return {
        "setting": {"name": setting, **dataclasses.asdict(s), "threads_per_rank": 1},
        "machine": machine(1),
        "rounds": args.rounds,
        "train_steps": args.train_steps,
        "runs": table,
        "ratios": ratios,
    }


# ----- where the time goes -----------------------------------------------------------------------
def gram_iteration_norm(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """[...]: σ_max(A) ≤ ‖G_t‖_F^(1/2^t) for [..., m, n] matrices (Gram iteration, Delattre,
    Barthélemy, Araujo & Allauzen 2023: G_0 = A, G_{i+1} = G_i^H·G_i, rescaled each time so
    nothing overflows). Certified, differentiable and matmul-only, within a factor
    min(m, n)^(1/2^(t+1)) of σ_max: the alternative to the normalisers' warm-start Cholesky
    certificate that --split measures beside it."""
    log_bound = torch.zeros(a.shape[:-2], dtype=a.real.dtype, device=a.device)
    g = a if a.shape[-2] >= a.shape[-1] else a.transpose(-1, -2).conj()  # the smaller Gram
    for i in range(iterations):
        # σ(G_i) = ‖G_i‖_F·σ(G_{i+1})^(1/2) with G_{i+1} the Gram of G_i/‖G_i‖_F
        norm = torch.linalg.matrix_norm(g).clamp_min(1e-30)
        log_bound = log_bound + 0.5**i * torch.log(norm)
        g = g / norm[..., None, None].to(g.dtype)
        g = g.transpose(-1, -2).conj() @ g
    last = torch.linalg.matrix_norm(g).clamp_min(1e-30)
    return torch.exp(log_bound + 0.5**iterations * torch.log(last))


def certificate_rungs(groups: list, counts: dict[str, int]) -> None:
    """Add to `counts` which rung of the Cholesky certificate (spectral.certify; the last: the
    Frobenius fallback) each conv's next normalisation is certified by, and how many of those
    bind the layer (σ̂ above its budget, so that the rung sets its scale): the normalisers' own
    steps on the convs' current weights and warm-start vectors, which they leave unchanged."""
    from pipeline.flows import spectral
    from pipeline.flows.base import compute_dtype

    with torch.no_grad():
        for convs in groups:
            normaliser, coeff = convs[0].normaliser, convs[0].coeff
            weights = torch.stack([c.weight.detach() for c in convs])
            weights = weights.to(compute_dtype(weights))
            vectors = torch.stack([c.spectral_vectors for c in convs])
            warmup = not all(c._warm for c in convs)
            grams = normaliser.grams(weights)
            lower = normaliser.iterate(grams, vectors, warmup)[2].amax(-1)
            bound, rung = spectral.certify(
                grams, lower, with_rung=True, at_failures=spectral.CANDIDATES
            )
            binding = bound * normaliser.inflation * normaliser.overlap**2 > coeff**2
            for index, binds in zip(rung.tolist(), binding.tolist(), strict=True):
                for key in [f"rung_{index}"] + ([f"binding_rung_{index}"] if binds else []):
                    counts[key] = counts.get(key, 0) + 1


def normalisation_split(setting: str, args: argparse.Namespace) -> dict:
    """The certified default's normalisation of every subnet conv (untrained model, training
    mode), CPU ms per step (median of --rounds), by the normalisers' own stages (their
    record_function names, read from a torch.profiler run: the profiler's per-op bookkeeping is
    in these, not in the whole): Grams, power step, Cholesky certificate, differentiable scales;
    the backward pass of the scales; the whole, forward and backward, level by level as training
    runs it, timed without the profiler. Beside it, Gram iteration (gram_iteration_norm, 6
    iterations) on the same frequencies, timed forward and backward, and both certificates'
    tightness against the exact top (all eigenvalues) on the same frequencies."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from pipeline.flows import lipschitz, spectral

    s, _ = resolve(setting, args, threads=1)
    torch.manual_seed(0)
    model, _ = lipflow_model("default", s)
    model.train()
    groups = [g for level in model.levels for g in level.spectral_groups]

    def normalise(profiled: bool = False) -> dict[str, float]:
        profiler = torch_profile(activities=[ProfilerActivity.CPU])
        with profiler if profiled else contextlib.nullcontext():
            scales = []
            for level in model.levels:
                lipschitz.normalise_groups(level.spectral_groups)
                scales += [c._prepared for g in level.spectral_groups for c in g]
                lipschitz.release_groups(level.spectral_groups)
        start = time.process_time()
        torch.autograd.backward(torch.stack(scales).sum())
        backward = time.process_time() - start
        events = profiler.key_averages() if profiled else []
        stages = {
            e.key.removeprefix("spectral_norm/"): e.cpu_time_total / 1e6
            for e in events
            if e.key.startswith("spectral_norm/")
        }
        return {**stages, "backward": backward}

    def iterated_matrices(normaliser, weights: torch.Tensor) -> torch.Tensor:
        """[B, F, m, n]: what Gram iteration bounds, the symbol at each frequency (one "frequency"
        for a matrix normaliser)."""
        if isinstance(normaliser, lipschitz.FourierNormaliser):
            phases = spectral.tap_phases(
                normaliser.kernel_size, normaliser.freq, weights.dtype, weights.device
            )
            return spectral.symbol(weights[:, None], phases[None])
        return spectral.matrix_side(weights.flatten(-3))[:, None]

    def gram_iteration() -> float:
        start = time.process_time()
        for convs in groups:
            weights = torch.stack([c.weight for c in convs])
            a = iterated_matrices(convs[0].normaliser, weights)
            gram_iteration_norm(a, 6).sum().backward()
        return time.process_time() - start

    def tightness() -> dict:
        """max over convs of certified/exact - 1 (on σ²), by route."""
        worst = {"cholesky": 0.0, "gram_iteration": 0.0}
        with torch.no_grad():
            for convs in groups:
                normaliser = convs[0].normaliser
                weights = torch.stack([c.weight for c in convs])
                grams = normaliser.grams(weights)
                exact = torch.linalg.eigvalsh(grams)[..., -1].amax(-1)
                top = lipschitz.group_top(convs, update=False)
                certified = normaliser.sigma_sq(weights, top) / normaliser.inflation
                a = iterated_matrices(normaliser, weights)
                iterated = gram_iteration_norm(a, 6).amax(-1) ** 2
                keep = exact > 0
                for name, value in (("cholesky", certified), ("gram_iteration", iterated)):
                    if keep.any():
                        ratio = (value[keep] / exact[keep]).max().item() - 1
                        worst[name] = max(worst[name], ratio)
        return {k: f"{v:.2e}" for k, v in worst.items()}

    def probe() -> dict:
        """AdamW steps on the bench batch; how many normalisations each rung served."""
        x = batch(s)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.probe_lr)
        rungs: dict[str, int] = {}
        for _ in range(args.probe_steps):
            certificate_rungs(groups, rungs)  # what this step's normalisations certify by
            optimizer.zero_grad(set_to_none=True)
            model(x)["bpd"].mean().backward()
            optimizer.step()
        return dict(sorted(rungs.items()))

    normalise()  # warm-up: the first backward pass sets up the autograd engine
    untrained: dict[str, int] = {}
    certificate_rungs(groups, untrained)  # what the first round's normalisations certify by
    runs = []
    for _ in range(max(args.rounds, 1)):
        model.zero_grad(set_to_none=True)
        stages = normalise(profiled=True)
        model.zero_grad(set_to_none=True)
        start = time.process_time()
        normalise()
        stages["all_forward_backward"] = time.process_time() - start
        stages["gram_iteration_forward_backward"] = gram_iteration()
        runs.append(stages)
    median = {k: round(statistics.median(r[k] for r in runs) * 1e3, 1) for k in runs[0]}
    routes = [g[0].normaliser for g in groups]
    return {
        "setting": {"name": setting, **dataclasses.asdict(s)},
        "convs": sum(len(g) for g in groups),
        "groups": len(groups),
        "fourier_routes": {
            r: sum(isinstance(n, lipschitz.FourierNormaliser) and n.freq.route == r for n in routes)
            for r in ("torus", "grid")
        },
        "cpu_ms": median,
        "rungs_untrained": dict(sorted(untrained.items())),
        "excess_over_exact_top": tightness(),
        **(
            {"probe": {"steps": args.probe_steps, "lr": args.probe_lr, "rungs": probe()}}
            if args.probe_steps
            else {}
        ),
    }


def profile(setting: str, names: list[str], args: argparse.Namespace) -> dict:
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    s, threads = resolve(setting, args)
    x = batch(s)
    out = {}
    for name in names:
        arm = build_arm(name, s, x)
        for _ in range(args.warmup):
            arm.step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                with record_function("step"):
                    arm.step()
        # not the step's or the normalisers' named ranges: their self time is Python's
        events = [
            e
            for e in prof.key_averages()
            if e.key != "step" and not e.key.startswith("spectral_norm/")
        ]
        total = sum(e.self_cpu_time_total for e in events)
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
        out[name] = {
            "self_cpu_ms_per_step": round(total / args.profile_steps / 1e3, 2),
            "top_ops_self_cpu": [
                {
                    "op": e.key,
                    "ms_per_step": round(e.self_cpu_time_total / args.profile_steps / 1e3, 3),
                    "share": round(e.self_cpu_time_total / total, 4),
                    "calls_per_step": e.count // args.profile_steps,
                }
                for e in top
            ],
        }
    return {"setting": {"name": setting, **dataclasses.asdict(s), "threads": threads}, **out}


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.settings, args.rounds, args.steps, args.warmup = "quick", 2, 1, 1
    settings = [v.strip() for v in args.settings.split(",") if v.strip()]
    unknown = [v for v in settings if v not in SETTINGS]
    if unknown:
        raise PipelineError(f"unknown setting(s) {unknown}: choose from {', '.join(SETTINGS)}")
    names = arm_names(args.profile or args.arms)
    if NORMFLOWS in names:
        import_normflows()  # say so before building anything
    modes = {
        "split": (args.split, lambda setting: normalisation_split(setting, args)),
        "launched": (args.ranks, lambda setting: launched(setting, names, args)),
        "profile": (args.profile, lambda setting: profile(setting, names, args)),
    }
    for key, (chosen, measure) in modes.items():
        if chosen:
            out = {key: []}
            for setting in settings:
                out[key].append(measure(setting))
                save(out, args.out)
            emit(out)
            return 0
    out = {
        "method": (
            "fp32 CPU, forward + backward + AdamW on one fixed batch; interleaved rounds in "
            "one process (order rotating), median step time over all timed steps"
        ),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "warmup": args.warmup,
        "normflows": normflows_version() if NORMFLOWS in names else None,
        "results": [],
    }
    for setting in settings:
        out["results"].append(compare(setting, names, args))
        save(out, args.out)
    emit(out)
    return 0


def save(out: dict, path: str | None) -> None:
    """The results so far, so that a run of hours that is stopped keeps its finished settings."""
    if path:
        atomic_write_text(path, json.dumps(out, indent=1) + "\n")


def normflows_version() -> str:
    return getattr(import_normflows(), "__version__", "unknown")
