"""The exploding-inverse battery (docs/design.md §3.6; Behrmann et al., AISTATS 2021, "Understanding and
mitigating exploding inverses in invertible neural networks").

MLE rewards volume expansion (§3.3): a flow trained without bounds can keep its forward pass tame on
the data while its inverse (the sampler) and its forward pass off the data blow up, and the training
loss never shows it. The battery measures the three faces of that failure on a trained flow.

1. Inputs: n images from each family below (the data lie in [-1/2, 1/2], docs/design.md §3):

       val         the caller's validation images
       negative    -x_val: the same faces with colours inverted (another family, same range)
       noise_1x    U(-1/2, 1/2) per pixel: uniform noise at 1×, 3× and 10× the data range
       noise_3x    U(-3/2, 3/2)
       noise_10x   U(-5, 5)
       normal      N(0, 1) per pixel
       constant    one value for every pixel, evenly spaced over [-1/2, 1/2] across the images

   For each: the reconstruction error of x -> z -> x and the finiteness of bpd, in `dtype` (float64
   by default, so that what explodes is the map, not float32's range).
2. Samples: n_samples images at each temperature T (z ~ N(0, T²) at the top, each split's z from
   its prior at temperature T), in `dtype`: the fraction with a non-finite pixel and the largest |x|.
3. Gradients: ∇ of the mean bpd of the first n_grad val images with `memory="invertible"` (step
   inputs reconstructed through the inverse, flows/memory.py) against `memory="store"`, in float32
   (the training dtype, where an ill-conditioned inverse shows first).

Metrics, flat names ready for MLflow (`family` as above, T formatted with "g": 0.7, 1, 1.5, 2):

    battery/<family>/recon_error        max over images of ‖x̂ − x‖_∞ / max(‖x‖_∞, 1/2), x̂ = f⁻¹(f(x))
                                        (relative to the image's largest |pixel|, floored at the data
                                        range's 1/2 so a constant-0 image does not divide by zero)
    battery/<family>/recon_finite_frac  fraction of images whose reconstruction x̂ is finite
    battery/<family>/finite_frac        fraction of images whose bpd is finite
    battery/<family>/bpd                median bpd over the images where it is finite
    battery/<family>/bpd_max            largest finite bpd
    battery/sample_T<T>/nonfinite_frac  fraction of samples with at least one non-finite pixel
    battery/sample_T<T>/max_abs         largest |x| over the finite pixels of all samples
    battery/invertible_grad_rel_error   ‖g_invertible − g_store‖₂ / ‖g_store‖₂ over all parameters

Non-finite values: every error, bpd and maximum is taken over the finite part of its population and
the matching fraction counts the rest, so a value is a finite float unless its population is empty
(then NaN: no finite reconstruction, bpd or sample pixel) or the gradients themselves are non-finite
(NaN when g_store is, inf when only g_invertible is). metrics.jsonl keeps NaN/inf, MLflow's delivery
skips them (the fractions, always finite, still say what happened) and `json_safe` writes them as
strings in summary.json and `probe --json`.

The caller's model is never touched: the battery works on deep copies (a DeepSpeed engine is
unwrapped to its `.module`). It needs `forward(x)["bpd"]`, `encode(x) -> (zs, logdet)`,
`decode(zs)`, `sample(n, temperature=, generator=)` and a `memory` attribute (MultiScaleFlow).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

TEMPERATURES = (0.7, 1.0, 1.5, 2.0)
FAMILIES = ("val", "negative", "noise_1x", "noise_3x", "noise_10x", "normal", "constant")
NOISE_SCALES = {"noise_1x": 1.0, "noise_3x": 3.0, "noise_10x": 10.0}
DATA_HALF_RANGE = 0.5  # x = k/2^n - 1/2 + U(0, 2^-n) lies in [-1/2, 1/2]


def exploding_inverse_battery(
    model: torch.nn.Module,
    x_val: torch.Tensor,
    *,
    temperatures: Sequence[float] = TEMPERATURES,
    n_images: int = 16,
    n_samples: int = 32,
    n_grad: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    gradients: bool = True,
    stage: Callable[[str], AbstractContextManager] = nullcontext,
) -> dict[str, float]:
    """The battery's metrics (module docstring) for `model` (a flow or a DeepSpeed engine wrapping
    one) and validation images `x_val` [B, C, H, W] (at least one; the first n_images are used).
    `stage(description)` wraps each family, temperature and the gradients (progress.stage in the
    probe command: a pass of 4 images through a 256² model takes a minute on a CPU core).

    Deterministic given `seed`: the off-data inputs and the samples come from seeded generators
    (the inputs on the CPU, so they are the same on every device). Cost: 7·n_images forward and
    encode/decode passes, n_samples decodes per temperature, and two forward/backward passes of
    n_grad images: a few seconds on a CPU for the demo model.
    """
    if x_val.dim() != 4 or x_val.shape[0] < 1:
        raise ValueError(
            f"x_val must be a [B, C, H, W] batch of at least 1, got {tuple(x_val.shape)}"
        )
    base = getattr(model, "module", model)  # DeepSpeed engine -> the flow
    device = next(base.parameters()).device
    metrics: dict[str, float] = {}
    flow = _copy(base, dtype)
    inputs = input_families(x_val[:n_images].detach().cpu(), n_images, seed)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for name, x in inputs.items():
            with stage(f"battery: {len(x)} {name} images through x -> z -> x"):
                x = x.to(device, dtype)
                for key, value in probe_inputs(flow, x).items():
                    metrics[f"battery/{name}/{key}"] = value
        generator = torch.Generator(device=device)
        for temperature in temperatures:
            with stage(f"battery: {n_samples} samples at T = {temperature:g}"):
                generator.manual_seed(seed)
                x = flow.sample(n_samples, temperature=temperature, generator=generator)
                for key, value in sample_stats(x).items():
                    metrics[f"battery/sample_T{temperature:g}/{key}"] = value
    del flow
    if gradients:
        with stage(f"battery: gradients of {min(n_grad, len(x_val))} images, stored vs invertible"):
            metrics["battery/invertible_grad_rel_error"] = invertible_grad_rel_error(
                base, x_val[:n_grad].to(device), seed=seed
            )
    return metrics


def battery_damage(metrics: dict[str, float]) -> str | None:
    """What makes a battery's model unusable, in one line, or None: samples with a non-finite
    pixel at any temperature, images of any family (validation or off the data) with a
    non-finite bpd or reconstruction. "non-finite samples at T=2 (41%); non-finite bpd on
    noise_10x (100%)". A run that ends so is "finished_damaged" (train/loop.py)."""
    samples, bpd, recon = [], [], []
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) != 3 or not isinstance(value, int | float):
            continue
        _, name, stat = parts
        if stat == "nonfinite_frac" and value > 0:
            samples.append(f"{name.removeprefix('sample_').replace('T', 'T=')} ({100 * value:.0f}%)")
        elif stat == "finite_frac" and value < 1:
            bpd.append(f"{name} ({100 * (1 - value):.0f}%)")
        elif stat == "recon_finite_frac" and value < 1:
            recon.append(f"{name} ({100 * (1 - value):.0f}%)")
    found = [
        f"non-finite {what} {', '.join(where)}"
        for what, where in (
            ("samples at", samples),
            ("bpd on", bpd),
            ("reconstructions of", recon),
        )
        if where
    ]
    return "; ".join(found) or None


CHECK_TEMPERATURE = 1.0


def sampler_check(model: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """The guard's small battery (docs/design.md §5), run before a checkpoint may become a rollback
    target and at every diagnostics step: on the live model (eval mode, no autograd, restored
    after), in float32 without autocast (the weights the sampler will use, not bf16's rounding):

        check/recon_error           max |f⁻¹(f(x)) − x| over the fixed images ``x`` (inf when a
                                    reconstruction is non-finite)
        check/bpd_finite_frac       fraction of those images with a finite bpd
        check/sample_nonfinite_frac fraction of len(x) samples at T = 1, from a latent fixed by
                                    ``seed``, with a non-finite pixel

    Deterministic: the same weights give the same numbers (its own generator; the global RNG is
    untouched, so an exact resume stays exact). Cost: one forward, one encode/decode and one
    sample of len(x) images; inside flows.base.reuse_weights (as the loop calls it) the four
    walks normalise the subnets' weights once.
    """
    flow = getattr(model, "module", model)
    was_training = flow.training
    flow.eval()
    try:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            x = x.to(torch.float32)
            try:
                bpd = flow(x)["bpd"]
                x_rec = flow.decode(flow.encode(x)[0])
            except torch.linalg.LinAlgError:  # a singular weight: no density, no inverse
                bpd = x_rec = torch.full_like(x, math.nan)
            generator = torch.Generator(device=x.device).manual_seed(seed)
            samples = flow.sample(len(x), temperature=CHECK_TEMPERATURE, generator=generator)
    finally:
        flow.train(was_training)
    error = (x_rec - x).abs().max()
    return {
        "check/recon_error": float(error) if torch.isfinite(x_rec).all() else math.inf,
        "check/bpd_finite_frac": float(torch.isfinite(bpd).double().mean()),
        "check/sample_nonfinite_frac": sample_stats(samples)["nonfinite_frac"],
    }


def input_families(x_val: torch.Tensor, n: int, seed: int) -> dict[str, torch.Tensor]:
    """{family: images} (module docstring), in float64 on the CPU; the val family is `x_val`."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, *x_val.shape[1:])
    x_val = x_val.to(torch.float64)
    families = {"val": x_val, "negative": -x_val}
    for name, scale in NOISE_SCALES.items():
        noise = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
        families[name] = scale * 2 * DATA_HALF_RANGE * noise
    families["normal"] = torch.randn(shape, generator=g, dtype=torch.float64)
    levels = torch.linspace(-DATA_HALF_RANGE, DATA_HALF_RANGE, n, dtype=torch.float64)
    families["constant"] = levels.view(n, 1, 1, 1).expand(shape).clone()
    assert tuple(families) == FAMILIES
    return families


def probe_inputs(flow: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Reconstruction and bpd statistics of one family (keys as in the module docstring, without
    the battery/<family>/ prefix), computed in x's dtype."""
    n = x.shape[0]
    try:
        bpd = flow(x)["bpd"].to(torch.float64)
    except torch.linalg.LinAlgError:  # a singular weight: no density anywhere
        bpd = torch.full((n,), math.nan, dtype=torch.float64)
    try:
        x_rec = flow.decode(flow.encode(x)[0])
    except torch.linalg.LinAlgError:
        x_rec = torch.full_like(x, math.nan)
    rec_ok = torch.isfinite(x_rec).flatten(1).all(1)
    scale = x.abs().flatten(1).amax(1).clamp_min(DATA_HALF_RANGE)
    error = ((x_rec - x).abs().flatten(1).amax(1) / scale)[rec_ok]
    finite_bpd = bpd[torch.isfinite(bpd)]
    return {
        "recon_error": _reduce(error, "max"),
        "recon_finite_frac": float(rec_ok.double().mean()),
        "finite_frac": finite_bpd.numel() / n,
        "bpd": _reduce(finite_bpd, "median"),
        "bpd_max": _reduce(finite_bpd, "max"),
    }


def sample_stats(x: torch.Tensor) -> dict[str, float]:
    """{nonfinite_frac: samples with a non-finite pixel, max_abs: largest finite |pixel|}."""
    finite = torch.isfinite(x)
    return {
        "nonfinite_frac": float((~finite.flatten(1).all(1)).double().mean()),
        "max_abs": _reduce(x[finite].abs().to(torch.float64), "max"),
    }


def invertible_grad_rel_error(model: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> float:
    """‖g_invertible − g_store‖₂ / ‖g_store‖₂ for g = ∇_θ mean bpd(x), in float32, on copies of the
    flow in eval mode (frozen power iterations, so both passes compute the same map), each pass
    starting from the same RNG state (Hutchinson probes of residual blocks)."""
    base = getattr(model, "module", model)
    grads = []
    for memory in ("store", "invertible"):
        flow = _copy(base, torch.float32)
        flow.memory = memory
        for p in flow.parameters():
            p.requires_grad_(True)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.autocast(x.device.type, enabled=False):
            torch.manual_seed(seed)
            flow(x.to(torch.float32))["bpd"].mean().backward()
        grads.append(_flat_grad(flow.parameters()))
        del flow
    g_store, g_inv = grads
    norm = float(torch.linalg.vector_norm(g_store))
    diff = float(torch.linalg.vector_norm(g_inv - g_store))
    if not math.isfinite(norm):
        return math.nan
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def _copy(flow: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A deep copy in `dtype` and eval mode: the battery changes dtype and memory mode."""
    out = copy.deepcopy(flow).to(dtype).eval()
    for p in out.parameters():
        p.grad = None
    return out


def _flat_grad(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    parts = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().to(torch.float64).flatten()
        for p in params
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _reduce(values: torch.Tensor, how: str) -> float:
    """max or (lower) median of a 1-D tensor as a float; NaN when it is empty."""
    if values.numel() == 0:
        return math.nan
    return float(values.max() if how == "max" else values.median())
