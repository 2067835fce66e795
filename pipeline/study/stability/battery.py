"""The exploding-inverse battery of each run (docs/design.md §3.6): the one its summary holds,
else a probe of its final or last good checkpoint; and the headline numbers the tables show."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from pipeline.study.runner import Runner, RunSpec

# finished_damaged: trained to the end, but the final battery found non-finite samples or bpd
FINISHED = ("finished", "finished_damaged")
PROBED = (*FINISHED, "diverged")  # a battery on the final or on the last good checkpoint

# The battery's headline numbers (metric names of pipeline/theory/battery.py).
OOD = ("negative", "noise_1x", "noise_3x", "noise_10x", "normal", "constant")
SAMPLE_T = ("1.5", "2")

# the battery's numbers per run that the tables show (battery_headline)
BATTERY_HEADLINE = [
    "OOD finite bpd frac",
    "recon err noise 3x",
    "nonfinite samples T1.5",
    "nonfinite samples T2",
    "max abs x T2",
    "grad rel err",
]


def add_battery(runner: Runner, spec: RunSpec, result: dict, probe: tuple[str, ...]) -> bool:
    """Put the exploding-inverse battery into a finished or diverged run's ``result`` as
    ``battery`` (flat metrics), with ``battery_source`` and ``battery_step`` (once: a result that
    has a source keeps its battery). Returns whether ``result`` changed.

    Finished: the battery the loop wrote into the summary, else a probe of the final checkpoint.
    Diverged: a probe of its last good checkpoint (``checkpoint.find_good``). A probe that fails is
    recorded as ``battery_error`` (the run's other results stand) and tried again on a rerun.
    """
    from pipeline.train import checkpoint

    if result.get("status") not in PROBED or result.get("battery_source"):
        return False
    if result["status"] in FINISHED and summary_battery(result):
        result["battery"], result["battery_source"] = summary_battery(result), "summary"
        result["battery_step"] = result.get("steps")
        return True
    root = runner.run_dir(spec.name) / "checkpoints"
    if result["status"] in FINISHED:
        folder = Path(result["checkpoint"]) if result.get("checkpoint") else None
        source = "probe of the final checkpoint"
    else:
        folder = checkpoint.find_good(root) if root.is_dir() else None
        source = "probe of the last good checkpoint"
    if folder is None:
        result["battery_error"] = f"no checkpoint to probe under {root}"
        return True
    try:
        metrics = runner.pipeline_json(
            ["probe", "--checkpoint", str(folder), "--json", *probe], spec.name
        )
    except RuntimeError as e:
        result["battery_error"] = str(e)
        return True
    result["battery"] = {k: as_float(v) for k, v in metrics.items() if k.startswith("battery/")}
    result["battery_source"] = source
    result["battery_checkpoint"] = str(folder)
    result["battery_step"] = checkpoint.step_of(folder)
    result.pop("battery_error", None)
    return True


def summary_battery(result: dict) -> dict[str, float]:
    """The battery metrics a summary holds, flat (``battery/...`` keys) or under ``battery``."""
    nested = result.get("battery") if isinstance(result.get("battery"), dict) else {}
    flat = {k: v for k, v in {**result, **nested}.items() if k.startswith("battery/")}
    return {k: as_float(v) for k, v in flat.items()}


def as_float(v) -> float:
    """A metric as written by json_safe (non-finite floats as "nan"/"inf" strings)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def battery_headline(b: dict | None) -> dict:
    """One run's battery, in the numbers the tables show (None where it has no battery)."""
    names = [*BATTERY_HEADLINE, *(f"finite bpd {family}" for family in OOD)]
    if not b:
        return dict.fromkeys(names)
    b = {k: as_float(v) for k, v in b.items()}  # a result file holds non-finite values as strings
    finite = {f: b.get(f"battery/{f}/finite_frac", math.nan) for f in OOD}
    return {
        "OOD finite bpd frac": statistics.fmean(finite.values()),
        "recon err noise 3x": b.get("battery/noise_3x/recon_error", math.nan),
        "nonfinite samples T1.5": b.get("battery/sample_T1.5/nonfinite_frac", math.nan),
        "nonfinite samples T2": b.get("battery/sample_T2/nonfinite_frac", math.nan),
        "max abs x T2": b.get("battery/sample_T2/max_abs", math.nan),
        "grad rel err": b.get("battery/invertible_grad_rel_error", math.nan),
        **{f"finite bpd {f}": v for f, v in finite.items()},
    }
