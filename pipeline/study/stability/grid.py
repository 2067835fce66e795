"""The stability study's grid: its three arms, the cells (learning rate, clipping, precision)
every arm and seed runs in, the settings (CPU, --quick, --config) and the plan of runs they make."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import preset_overrides
from pipeline.study.runner import RunSpec

# The glow and bounded presets (pipeline/flows/config.py) key by key, as the study's runs had them.
GLOW = preset_overrides("glow")
OLD_BOUNDED = preset_overrides("bounded")
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "glow": (
        "unconstrained Glow (exp-scale affine coupling, LU 1x1 conv, unbounded actnorm)",
        GLOW,
    ),
    "certified": ("the certified default (the model section's defaults, no override)", ()),
    "bounded": (
        "the old bounded preset (tanh-bounded affine coupling without spectral norm, SVD 1x1 "
        "conv, bounded actnorm: bounded, not certified)",
        OLD_BOUNDED,
    ),
}


@dataclass(frozen=True)
class Cell:
    """One training condition of the grid; every arm and seed runs in it."""

    lr: float
    clip: bool  # gradient clipping at the config's train.grad_clip, else train.grad_clip=0
    precision: str | None = None  # train.precision (bf16: autocast subnets); None: the config's

    @property
    def tag(self) -> str:
        return f"lr{self.lr:g}-{'clip' if self.clip else 'noclip'}" + (
            f"-{self.precision}" if self.precision else ""
        )

    @property
    def overrides(self) -> list[str]:
        return [
            f"train.lr={self.lr!r}",
            *([] if self.clip else ["train.grad_clip=0"]),
            *([f"train.precision={self.precision}"] if self.precision else []),
        ]


def cells(clip_lrs=(), noclip_lrs=(), bf16_lrs=()) -> tuple[Cell, ...]:
    """The grid: a sweep with clipping, one without (both in the config's precision), bf16 cells
    (with clipping)."""
    return (
        *(Cell(lr, True) for lr in clip_lrs),
        *(Cell(lr, False) for lr in noclip_lrs),
        *(Cell(lr, True, "bf16") for lr in bf16_lrs),
    )


@dataclass(frozen=True)
class Sweep:
    """A base config and what the study adds to it; the command line overrides each field."""

    config: str
    steps: int | None  # None: the config's train.steps
    resolution: int | None  # None: the config's data.resolution
    clip_lrs: tuple[float, ...]
    noclip_lrs: tuple[float, ...]
    bf16_lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()
    probe: tuple[str, ...] = ()  # options of `pipeline probe` (the battery's sizes)

    @property
    def cells(self) -> tuple[Cell, ...]:
        return cells(self.clip_lrs, self.noclip_lrs, self.bf16_lrs)


# CPU-feasible (2 shared cores, about an hour): demo.yaml's 3-level flow on 16x16 faces, narrower
# and with smaller batches; checkpoints every 25 steps are the guard's rollback targets and the last
# good checkpoints the battery probes. Learning rates: 1e-2, where no arm needs the guard (the bpd
# reference), then each sweep straddles the divergence transition, placed by a 1-seed screening
# (docs/studies.md §1).
CPU = Sweep(
    config="configs/demo.yaml",
    steps=200,
    resolution=16,
    clip_lrs=(1e-2, 1e-1, 2e-1, 4e-1),
    noclip_lrs=(5e-2, 1e-1, 2e-1),
    bf16_lrs=(1e-1,),
    seeds=(0, 1, 2),
    overrides=(  # demo.yaml's values pinned too, so an edit there does not change the study
        "model.levels=3",
        "model.steps=4",
        "model.width=32",
        "train.micro_batch=16",
        "train.warmup_steps=20",
        "train.grad_clip=1.0",
        "guard.diagnostics_every=100",
        "data.synthetic_train=1024",
        "data.synthetic_val=128",
        "train.log_every=5",
        "train.save_every=25",
        "train.val_every=100",
        "train.samples=16",
    ),
)
# Seconds per run (tests): debug.yaml's tiny flow; lr=10 without clipping diverges within a few
# steps in every arm, and with no rollbacks allowed the guard stops the run at its third bad step.
QUICK = Sweep(
    config="configs/debug.yaml",
    steps=12,
    resolution=16,
    clip_lrs=(1e-3,),
    noclip_lrs=(10.0,),
    bf16_lrs=(),
    seeds=(0,),
    overrides=(
        "train.warmup_steps=0",
        "guard.max_rollbacks=0",
        "train.save_every=4",
        "train.log_every=2",
        "train.samples=4",
        "guard.diagnostics_every=6",
        "guard.battery_images=4",
    ),
    probe=("--images", "4", "--samples", "8", "--grad-images", "4"),  # as guard.battery_images=4
)
# --config X: the config's own size, steps and data; the study adds arms, cells and seeds.
# Learning rates have no default that fits every config: give --lrs (and --noclip-lrs, --bf16-lrs).
FULL = Sweep(
    config="",
    steps=None,
    resolution=None,
    clip_lrs=CPU.clip_lrs,
    noclip_lrs=(),
    bf16_lrs=(),
    seeds=CPU.seeds,
)


def plan(
    sweep: Sweep, arms: list[str], out: Path, experiment: str, extra: list[str]
) -> list[RunSpec]:
    """One run per cell x seed x arm; arms alternate, so a partial study stays paired. A run's
    ``precision`` (meta) is its cell's, else the config's."""
    from pipeline.config import load_config
    from pipeline.study.runner import shipped

    common = [
        f"data.cache={(out / 'data').resolve()}",
        f"tracking.experiment={experiment}",
        *([f"data.resolution={sweep.resolution}"] if sweep.resolution else []),
        *([f"train.steps={sweep.steps}"] if sweep.steps else []),
        *sweep.overrides,
    ]
    config = shipped(sweep.config) if sweep.config else None
    base_precision = load_config(config, [*common, *extra]).train.precision
    specs = []
    for cell in sweep.cells:
        for seed in sweep.seeds:
            for arm in arms:
                specs.append(
                    RunSpec(
                        name=f"{arm}-{cell.tag}-seed{seed}",
                        overrides=[
                            *common,
                            *ARMS[arm][1],
                            *cell.overrides,
                            f"train.seed={seed}",
                            *extra,
                        ],
                        meta={
                            "arm": arm,
                            "lr": cell.lr,
                            "clip": cell.clip,
                            "precision": cell.precision or base_precision,
                            "seed": seed,
                        },
                    )
                )
    return specs
