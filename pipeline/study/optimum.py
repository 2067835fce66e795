"""`python -m pipeline study optimum`: trained linear flows against the closed-form optimum (§3.2).

The optimum of the likelihood is fixed by the data; a linear per-position flow (actnorm + 1x1 convs
after one squeeze: the linear preset of pipeline/flows/config.py) has it in closed form, so
training must reach it and cannot beat it. Cases:

    gaussian   images whose squeezed position vectors are N(0, Σ) with a known Σ (theory.gaussian),
               written as PNG, sharded by `python -m pipeline shards`: the analytic optimum of Σ,
               the closed form on the shards, and the trained flow must all agree
    faces-R    synthetic faces at each resolution R (or real shards with --shards): the closed form
               on the train split against the trained flow

Per case: the analytic optimum (gaussian only), the data optimum (``theory/optimum_bpd`` the loop
logged: the pooled closed form over the train split, dequantisation integrated exactly), the achieved
bpd (the final checkpoint evaluated on the whole train split by `python -m pipeline evaluate`), and
the gap achieved - optimum. Outputs in ``--out``: optimum.md, optimum.csv, compare/ (the bpd curves
with the optimum dotted), runs/, results/, logs/.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.config import preset_overrides
from pipeline.study.report import is_number, run_compare, write_csv
from pipeline.study.runner import (
    Runner,
    RunSpec,
    add_runner_arguments,
    make_runner,
    pipeline,
    pipeline_json,
    read_jsonl,
    write_json,
)
from pipeline.track.compare import to_markdown

LINEAR = (*preset_overrides("linear"), "model.steps=2")
# The optimiser settings with which a linear flow reaches the optimum within 0.01 bpd in 300 steps
# (tests/test_headline.py); the whole train split enters the optimum, no flips (they change R).
TRAIN = (
    "train.lr=1e-2",
    "train.warmup_steps=10",
    "train.save_every=1000",
    "train.log_every=10",
    "guard.diagnostics_every=0",
    "data.hflip=false",
    "train.optimum_images=1000000",
)
COV_SEED, IMAGE_SEED, CHANNELS = 3, 4, 12  # Σ is 12x12: 3 colours x a 2x2 squeeze

COLUMNS = [
    "case",
    "data",
    "resolution",
    "train images",
    "analytic optimum",
    "data optimum",
    "achieved (train)",
    "gap",
    "val bpd",
    "steps",
    "status",
]


@dataclass(frozen=True)
class Scale:
    """How large the study is (CPU, or --quick); --resolution and --steps override two fields."""

    gaussian_resolution: int
    gaussian_images: int
    face_resolutions: tuple[int, ...]
    face_images: int  # train images; a val split of one eighth of that
    steps: int
    micro_batch: int = 64
    n_bits: int = 5


CPU = Scale(
    gaussian_resolution=16,
    gaussian_images=1024,
    face_resolutions=(16, 32),
    face_images=1024,
    steps=300,
)
QUICK = Scale(
    gaussian_resolution=16,
    gaussian_images=128,
    face_resolutions=(8, 16),
    face_images=128,
    steps=30,
    micro_batch=8,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/study-optimum", help="study folder (default %(default)s)")
    p.add_argument(
        "--resolution",
        nargs="+",
        type=int,
        help=f"face resolutions (default {' '.join(map(str, CPU.face_resolutions))})",
    )
    p.add_argument("--steps", type=int, help=f"train.steps per run (default {CPU.steps})")
    p.add_argument(
        "--shards",
        help="real faces instead of synthetic ones: a `pipeline shards` output root holding one "
        "folder per resolution (<shards>/<R>), e.g. data/celebahq",
    )
    p.add_argument("--experiment", default="lipflow-optimum", help="MLflow experiment name")
    p.add_argument("--quick", action="store_true", help="a tiny setting that runs in seconds")
    add_runner_arguments(p)


def run(args: argparse.Namespace) -> int:
    base = QUICK if args.quick else CPU
    scale = replace(
        base,
        face_resolutions=tuple(args.resolution or base.face_resolutions),
        steps=args.steps or base.steps,
    )
    runner = make_runner(args, "configs/debug.yaml")
    if runner is None:
        return 2
    out = runner.out
    cases = plan(scale, out, args.experiment, args.shards, args.overrides)
    if not runner.check([spec for _, spec in cases]):
        return 2
    if args.dry_run:
        runner.print_commands([spec for _, spec in cases])
        return 0
    start = time.perf_counter()
    rows, results = [], []
    for case, spec in cases:
        if case == "gaussian" and not args.report_only:
            write_gaussian_shards(scale, out)
        row, result = measure(runner, case, spec, scale, args.report_only)
        rows.append(row)
        results.append(result)
        print(row_line(row), flush=True)
    wall = time.perf_counter() - start
    write_csv(out / "optimum.csv", COLUMNS, rows)
    plots = run_compare(out, args.experiment, results)
    write_report(out, scale, args.shards, rows, plots, wall)
    return 0


def write_report(
    out: Path,
    scale: Scale,
    shards: str | None,
    rows: list[dict],
    plots: list[Path],
    wall: float,
) -> None:
    table = to_markdown(COLUMNS, [display(r) for r in rows])
    faces = f"shards under {shards}" if shards else f"{scale.face_images} synthetic"
    lines = [
        "# Optimum study: linear flows against the closed-form optimum",
        "",
        f"- linear flow: `{' '.join(LINEAR)}` on configs/debug.yaml, {scale.steps} steps of "
        f"{scale.micro_batch} images, `{' '.join(TRAIN)}`",
        f"- gaussian: {scale.gaussian_images} images {scale.gaussian_resolution}², Σ = "
        f"random_covariance({CHANNELS}, n_bits={scale.n_bits}, seed={COV_SEED}), images seed "
        f"{IMAGE_SEED}; faces: {faces}; {scale.n_bits}-bit",
        f"- wall time of this invocation: {wall:.0f} s",
        "",
        "bpd throughout; gap = achieved - data optimum (≥ 0 up to one dequantisation draw's noise: "
        "a linear flow cannot beat it).",
        "",
        table,
        *(f"![{p.stem}](compare/{p.name})\n" for p in plots),
    ]
    (out / "optimum.md").write_text("\n".join(lines))
    print("\n" + table)
    print(f"wrote {out / 'optimum.md'}, {out / 'optimum.csv'}")


def plan(
    scale: Scale, out: Path, experiment: str, shards: str | None, extra: list[str]
) -> list[tuple[str, RunSpec]]:
    common = [
        *LINEAR,
        *TRAIN,
        f"train.steps={scale.steps}",
        f"train.micro_batch={scale.micro_batch}",
        f"data.n_bits={scale.n_bits}",
        f"data.cache={(out / 'data').resolve()}",
        f"tracking.experiment={experiment}",
    ]
    r = scale.gaussian_resolution
    cases = [
        (
            "gaussian",
            RunSpec(
                name=f"gaussian-{r}",
                overrides=[
                    *common,
                    f"data.resolution={r}",
                    "data.source=shards",
                    f"data.shards={(gaussian_root(out) / 'shards' / str(r)).resolve()}",
                    *extra,
                ],
                meta={"case": "gaussian", "resolution": r},
            ),
        )
    ]
    for r in scale.face_resolutions:
        if shards:
            data = ["data.source=shards", f"data.shards={Path(shards).resolve() / str(r)}"]
        else:
            data = [
                "data.source=synthetic",
                f"data.synthetic_train={scale.face_images}",
                f"data.synthetic_val={max(1, scale.face_images // 8)}",
            ]
        cases.append(
            (
                f"faces-{r}",
                RunSpec(
                    name=f"faces-{r}",
                    overrides=[*common, f"data.resolution={r}", *data, *extra],
                    meta={"case": "faces", "resolution": r},
                ),
            )
        )
    return cases


def gaussian_root(out: Path) -> Path:
    return out / "gaussian"


def write_gaussian_shards(scale: Scale, out: Path) -> None:
    """PNG images of known covariance -> `python -m pipeline shards`; once (the manifest says)."""
    import numpy as np
    from PIL import Image

    from pipeline.data.quantise import to_pixels
    from pipeline.theory.gaussian import gaussian_images, random_covariance

    r, n = scale.gaussian_resolution, scale.n_bits
    root = gaussian_root(out)
    if (root / "shards" / str(r) / "manifest.json").is_file():
        return
    cov = random_covariance(CHANNELS, n_bits=n, seed=COV_SEED)
    levels = gaussian_images(
        scale.gaussian_images, cov, resolution=r, n_bits=n, seed=IMAGE_SEED, dequantize=False
    )
    src = root / "png"
    src.mkdir(parents=True, exist_ok=True)
    for i, k in enumerate(levels.numpy()):
        # n-bit levels in the top bits of an 8-bit PNG: the loader's quantise gives k back
        Image.fromarray(np.ascontiguousarray(to_pixels(k, n).transpose(1, 2, 0))).save(
            src / f"{i:05d}.png"
        )
    pipeline(
        [
            "shards",
            "--src",
            str(src),
            "--out",
            str(root / "shards"),
            "--resolution",
            str(r),
            "--shard-size",
            "64",
            "--workers",
            "1",
            "--quiet",
        ],
        out / "logs" / "gaussian-shards.log",
    )


def analytic_optimum(scale: Scale) -> float:
    from pipeline.theory.gaussian import gaussian_optimum, random_covariance

    cov = random_covariance(CHANNELS, n_bits=scale.n_bits, seed=COV_SEED)
    return gaussian_optimum(cov, resolution=scale.gaussian_resolution, n_bits=scale.n_bits).bpd


def measure(
    runner: Runner, case: str, spec: RunSpec, scale: Scale, report_only: bool
) -> tuple[dict, dict]:
    """(table row, run result): train (or find) the run, evaluate its final checkpoint on the train
    split (cached next to the result)."""
    if report_only:
        result = runner.find(spec)
    else:
        result, _ = runner.train(spec)
    row = {
        "case": case,
        "data": spec.meta["case"],
        "resolution": spec.meta["resolution"],
        "analytic optimum": analytic_optimum(scale) if spec.meta["case"] == "gaussian" else None,
        "data optimum": data_optimum(result, runner.run_dir(spec.name)),
        "val bpd": result.get("final_val_bpd"),
        "steps": result.get("steps"),
        "status": result["status"],
    }
    if result["status"] != "finished":
        return row, result
    cached = runner.result_path(spec.name).with_suffix(".eval.json")
    if cached.is_file():
        evaluation = json.loads(cached.read_text())
    elif report_only:
        return row, result
    else:
        evaluation = pipeline_json(
            [
                "evaluate",
                "--checkpoint",
                str(runner.run_dir(spec.name)),
                "--split",
                "train",
                "--json",
                "--batch-size",
                "16",  # the loader drops the last partial batch: small batches leave out < 16
            ],
            runner.log_path(spec.name),
        )
        write_json(cached, evaluation)
    row["train images"] = evaluation["images"]
    row["achieved (train)"] = evaluation["bpd"]
    if is_number(row["data optimum"]):
        row["gap"] = evaluation["bpd"] - row["data optimum"]
    return row, result


def data_optimum(result: dict, run_dir: Path) -> float | None:
    """theory/optimum_bpd of the run: from its summary, else the first value in metrics.jsonl."""
    if is_number(result.get("optimum_bpd")):
        return result["optimum_bpd"]
    return next(
        (
            r["theory/optimum_bpd"]
            for r in read_jsonl(run_dir / "metrics.jsonl")
            if "theory/optimum_bpd" in r
        ),
        None,
    )


def display(row: dict) -> dict:
    shown = {c: row.get(c) for c in COLUMNS}
    for c in ("analytic optimum", "data optimum", "achieved (train)", "val bpd"):
        shown[c] = f"{row[c]:.4f}" if is_number(row.get(c)) else "-"
    shown["gap"] = f"{row['gap']:+.4f}" if is_number(row.get("gap")) else "-"
    shown["train images"] = row.get("train images", "-")
    return shown


def row_line(row: dict) -> str:
    d = display(row)
    return (
        f"{row['case']}: {row['status']}, analytic {d['analytic optimum']}, data optimum "
        f"{d['data optimum']}, achieved {d['achieved (train)']} (gap {d['gap']})"
    )
