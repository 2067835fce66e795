"""The multi-scale flow (Dinh et al. 2017, RealNVP §3.6; Kingma & Dhariwal 2018, Glow §3).

    x ─▶ level 0: squeeze → K steps → split ─▶ level 1 ... ─▶ level L-1: squeeze → K steps ─▶ z_top
                                        └─▶ z_0 ~ N(μ(h), σ(h)²)   (learned conditional prior)

log p(x) = Σ_l log p(z_l | h_l) + log N(z_top; 0, I) + Σ_blocks log|det J_block|           (nats)
bpd      = -log p(x)/(D·ln 2) + n_bits,  D = C·H·W, for x = k/2^n - 1/2 + U(0, 2^-n)     (docs/design.md §3)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from pipeline.flows.actnorm import ActNorm
from pipeline.flows.base import FlowBlock, frozen, main_dtype, reuse_weights, run_subnet
from pipeline.flows.config import ModelConfig
from pipeline.flows.conv1x1 import InvConv1x1LU, InvConv1x1SVD
from pipeline.flows.coupling import Coupling
from pipeline.flows.lipschitz import (
    HeldNormalisation,
    LipschitzConv2d,
    Share,
    normalise_groups,
    release_groups,
    spectral_groups,
)
from pipeline.flows.memory import MemoryMode, run_steps
from pipeline.flows.residual import ResidualBlock

LOG_2PI = math.log(2 * math.pi)


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2]: 2×2 patches to channels (RealNVP §3.6), an isometry."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, 2 * h, 2 * w)


def standard_normal_logp(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed per sample."""
    return -0.5 * (z * z + LOG_2PI).flatten(1).sum(1)


class Split(nn.Module):
    """Factor out half the channels: h -> (h_keep, z), with the learned conditional prior

        z ~ N(μ(h_keep), σ(h_keep)²),  (μ, h_σ) = conv3×3(h_keep), zero-init (Glow),
        log σ = α·tanh(h_σ/α)  (|log σ| ≤ α = log_std_bound; 0: log σ = h_σ, unbounded)

    so the prior starts as N(0, I). As a map it is a coordinate partition (an isometry): it
    contributes nothing to log|det J| or to the Lipschitz bounds of x -> z. The bound is for the
    sampler and for off-data inputs (docs/design.md §3.6): z = μ + T·σ·ε is T·e^α-Lipschitz in ε
    whatever h_keep is (an unbounded conv reached log σ ≈ ±777 on 10× noise, and exp overflowed),
    and each factored-out coordinate's log-density term -log σ stays within ±α. α = 8 leaves
    σ ∈ [3e-4, 3e3]: trained priors use |log σ| ≤ 4 on data (8-bit bins would need ≈ -6.8).
    """

    def __init__(self, c: int, learned: bool = True, log_std_bound: float = 0.0):
        super().__init__()
        self.c_keep = c // 2
        self.c_z = c - self.c_keep
        self.log_std_bound = log_std_bound
        self.prior = None
        if learned:
            self.prior = nn.Conv2d(self.c_keep, 2 * self.c_z, 3, padding=1)
            nn.init.zeros_(self.prior.weight)
            nn.init.zeros_(self.prior.bias)

    def mean_log_std(self, h_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prior is None:
            zeros = h_keep.new_zeros(h_keep.shape[0], self.c_z, *h_keep.shape[2:])
            return zeros, zeros
        out = run_subnet(self.prior, h_keep)
        mean, log_std = out[:, : self.c_z], out[:, self.c_z :]
        if self.log_std_bound:
            alpha = self.log_std_bound
            log_std = alpha * torch.tanh(log_std / alpha)
        return mean, log_std

    def forward(
        self, h: torch.Tensor, prior: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (h_keep, z, log p(z | h_keep) [B], or None without `prior`)."""
        h_keep, z = h[:, : self.c_keep], h[:, self.c_keep :]
        if not prior:
            return h_keep, z, None
        mean, log_std = self.mean_log_std(h_keep)
        eps = (z - mean) * torch.exp(-log_std)
        logp = -0.5 * (eps * eps + 2 * log_std + LOG_2PI).flatten(1).sum(1)
        return h_keep, z, logp

    def inverse(
        self,
        h_keep: torch.Tensor,
        z: torch.Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Re-attach z; with z None, draw it from the prior at the given temperature."""
        if z is None:
            mean, log_std = self.mean_log_std(h_keep)
            noise = torch.randn(
                mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
            )
            z = mean + temperature * torch.exp(log_std) * noise
        return torch.cat([h_keep, z], dim=1)


class LevelOut(NamedTuple):
    """What one level hands on: `h` to the next level (z_top after the last), the factored-out `z`
    and `logp` = log p(z | h) [B] (both None at the top level; `logp` None when the prior is not
    asked for), and one log-det [B] per block (empty when log-dets are not asked for)."""

    h: torch.Tensor
    z: torch.Tensor | None
    logp: torch.Tensor | None
    logdets: list[torch.Tensor]


class Level(nn.Module):
    """squeeze → flow steps → optional split. `steps` holds the blocks of all flow steps as one
    flat list (the state-dict layout); `flow_steps()` groups them back into flow steps."""

    def __init__(self, steps: list[list[tuple[str, FlowBlock]]], split: Split | None):
        super().__init__()
        blocks = [named for step in steps for named in step]
        self.names = [name for name, _ in blocks]
        self.steps = nn.ModuleList([block for _, block in blocks])
        self.step_sizes = [len(step) for step in steps]
        self.split = split
        # the subnet convs of all its flow steps, by position: each normalised in one batch
        self.spectral_groups = spectral_groups(self.steps)

    def flow_steps(self) -> list[list[FlowBlock]]:
        out, start = [], 0
        for size in self.step_sizes:
            out.append(list(self.steps[start : start + size]))
            start += size
        return out

    def forward(
        self,
        h: torch.Tensor,
        memory: MemoryMode = "store",
        *,
        logdet: bool = True,
        prior: bool = True,
        init: bool = False,
    ) -> LevelOut:
        """The one walk through a level that every x -> z direction of the model uses.

        With `logdet`, the blocks run as `memory` says (flows/memory.py) and return their log-dets;
        without, each block's `transform` (no costly log-det). `prior`: evaluate log p(z | h).
        `init`: initialise each ActNorm from the batch reaching it first (data init)."""
        h = squeeze(h)
        logdets: list[torch.Tensor] = []
        # batched normalisation, except where steps are re-run in the backward pass (each conv
        # then normalises itself, its autograd-free part cached for the re-run)
        batched = not (logdet and not init and torch.is_grad_enabled() and memory != "store")
        if batched:
            normalise_groups(self.spectral_groups)
        try:
            if logdet and not init:
                h, logdets = run_steps(self.flow_steps(), h, memory)
            else:
                for block in self.steps:
                    if init and isinstance(block, ActNorm):
                        block.initialize(h)
                    h = block.transform(h)
        finally:
            if batched:
                release_groups(self.spectral_groups)
        if self.split is None:
            return LevelOut(h, None, None, logdets)
        h_keep, z, logp = self.split(h, prior)
        return LevelOut(h_keep, z, logp, logdets)

    def inverse(
        self,
        h: torch.Tensor,
        z: torch.Tensor | None,
        temperature: float,
        generator: torch.Generator | None,
        inverted: Callable[[], object] | None = None,
    ) -> torch.Tensor:
        """The inverse walk: re-attach (or draw) z, invert the blocks (calling `inverted` after
        each), unsqueeze."""
        if self.split is not None:
            h = self.split.inverse(h, z, temperature, generator)
        normalise_groups(self.spectral_groups)
        try:
            for block in reversed(self.steps):
                h = block.inverse(h)
                if inverted is not None:
                    inverted()
        finally:
            release_groups(self.spectral_groups)
        return unsqueeze(h)


class MultiScaleFlow(nn.Module):
    """L levels × K steps of certified blocks. `forward(x)` returns the dict the training loop needs
    (DeepSpeed's engine calls forward); see the module docstring for the densities."""

    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, int, int], n_bits: int):
        super().__init__()
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        self.n_bits = n_bits
        c, h, w = image_shape
        self.dims = c * h * w
        levels = []
        self.level_shapes: list[tuple[int, int, int]] = []  # shape the steps of each level act on
        self.z_shapes: list[tuple[int, int, int]] = []  # shapes of encode()'s zs, in order
        for level in range(cfg.levels):
            c, h, w = 4 * c, h // 2, w // 2
            self.level_shapes.append((c, h, w))
            steps = [
                [
                    (f"level{level}/step{step}/{kind}", block)
                    for kind, block in make_step(cfg, (c, h, w), step)
                ]
                for step in range(cfg.steps)
            ]
            split = None
            if level < cfg.levels - 1:
                split = Split(c, cfg.split_prior == "learned", cfg.prior_log_std_bound)
                self.z_shapes.append((split.c_z, h, w))
                c = split.c_keep
            levels.append(Level(steps, split))
        self.z_shapes.append((c, h, w))
        self.levels = nn.ModuleList(levels)
        self.memory = cfg.memory  # how forward's backward pass gets activations (memory.py)

    # ----- density -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, per_block: bool = False) -> dict[str, torch.Tensor]:
        """-> {log_prob, logpz, logdet, bpd: [B]; logdet_levels: [L, B]} in float32 (float64 for
        float64 x); with per_block, also logdet_blocks: [n_blocks, B] in the order of `blocks()`.
        The backward pass gets its activations as `self.memory` says (pipeline/flows/memory.py)."""
        outs = self._walk(x, self.memory)
        z_top = outs[-1].h
        zero = z_top.new_zeros(z_top.shape[0])
        logpz = sum((out.logp for out in outs[:-1]), zero) + standard_normal_logp(z_top)
        logdet_levels = torch.stack([sum(out.logdets, zero) for out in outs])
        logdet = logdet_levels.sum(0)
        log_prob = logpz + logdet
        out = {
            "log_prob": log_prob,
            "logpz": logpz,
            "logdet": logdet,
            "logdet_levels": logdet_levels,
            "bpd": -log_prob / (self.dims * math.log(2)) + self.n_bits,
        }
        if per_block:
            blocks = [logdet for out in outs for logdet in out.logdets]
            out["logdet_blocks"] = torch.stack(blocks) if blocks else z_top.new_zeros(0, len(zero))
        return out

    def _walk(self, x: torch.Tensor, memory: MemoryMode = "store", **kwargs) -> list[LevelOut]:
        """x through every level (Level.forward, with `kwargs`), in the main-path dtype."""
        outs, h = [], x.to(main_dtype(x))
        for level in self.levels:
            outs.append(level(h, memory, **kwargs))
            h = outs[-1].h
        return outs

    def logdet_per_block(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{block name: log|det J| [B]} for diagnostics (the log-det balance, docs/design.md §3.5 (4))."""
        names = [name for _, name, _ in self.blocks()]
        return dict(zip(names, self.forward(x, per_block=True)["logdet_blocks"], strict=True))

    # ----- one optimizer step's normalisation --------------------------------------------------
    def normalised_groups(self) -> list[list[LipschitzConv2d]]:
        """The spectral-normalised convs, level by level and conv position by conv position: the
        groups each normalised in one batched computation (Level.spectral_groups)."""
        return [convs for level in self.levels for convs in level.spectral_groups]

    def hold_normalisation(
        self, micro_batches: int = 1, share: Share | None = None
    ) -> HeldNormalisation:
        """Certify every normalised conv once (advancing the warm-start vectors once) and hold
        the scales for the `micro_batches` forward/backward passes of one optimizer step, whose
        gradient through the scales is then applied once (lipschitz.HeldNormalisation). With
        `share`, each rank certifies its groups and one collective hands on the rest."""
        return HeldNormalisation(self.normalised_groups(), micro_batches, share)

    # ----- bijection ---------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x -> ([z_0, ..., z_top], log|det J| [B]); z_l: the factored-out parts, level by level."""
        outs = self._walk(x, prior=False)
        logdet = sum((d for out in outs for d in out.logdets), outs[-1].h.new_zeros(len(x)))
        return [out.z for out in outs[:-1]] + [outs[-1].h], logdet

    def decode(self, zs: list[torch.Tensor]) -> torch.Tensor:
        """[z_0, ..., z_top] -> x, the inverse of encode (residual blocks: to their tolerance)."""
        if len(zs) != len(self.levels):
            raise ValueError(
                f"decode needs {len(self.levels)} latents (one per level), got {len(zs)}"
            )
        return self._decode(zs[-1], list(zs[:-1]), temperature=1.0, generator=None)

    def _decode(
        self,
        h: torch.Tensor,
        zs: list[torch.Tensor] | None,
        temperature: float,
        generator: torch.Generator | None,
        inverted: Callable[[], object] | None = None,
    ) -> torch.Tensor:
        """Invert level by level from the top; a split with no given z draws it from its prior."""
        with frozen(self):
            for index in reversed(range(len(self.levels))):
                z = zs[index] if zs is not None and index < len(zs) else None
                h = self.levels[index].inverse(h, z, temperature, generator, inverted)
        return h

    def flat_latent(self, x: torch.Tensor) -> torch.Tensor:
        """x -> z as one [B, D] tensor (the map f whose Jacobian the bounds certify), without
        log-dets: for Jacobian-vector products and Lipschitz estimates."""
        outs = self._walk(x, logdet=False, prior=False)
        return torch.cat([out.z.flatten(1) for out in outs[:-1]] + [outs[-1].h.flatten(1)], dim=1)

    def unflatten_latent(self, z: torch.Tensor) -> list[torch.Tensor]:
        """[B, D] -> [z_0, ..., z_top], the inverse of the concatenation in `flat_latent`."""
        sizes = [math.prod(shape) for shape in self.z_shapes]
        parts = torch.split(z, sizes, dim=1)
        return [part.reshape(-1, *shape) for part, shape in zip(parts, self.z_shapes, strict=True)]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x -> z -> x (the inverse-error diagnostic)."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        inverted: Callable[[], object] | None = None,
    ) -> torch.Tensor:
        """n images: z_top ~ N(0, T²·I), then each split's z ~ N(μ, (T·σ)²) on the way down;
        `inverted` is called after each block (a progress bar: minutes per level at 1024²)."""
        param = next(self.parameters(), torch.zeros(()))  # a model may have no parameters at all
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        shape = (n, *self.z_shapes[-1])
        z_top = temperature * torch.randn(
            shape, generator=generator, device=param.device, dtype=dtype
        )
        return self._decode(z_top, None, temperature, generator, inverted)

    # ----- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> None:
        """ActNorm data-dependent init (Glow §3.1), an explicit step: propagate x level by level and
        initialise each ActNorm from the batch reaching it. Deterministic (no randomness, power
        iterations frozen), so all ranks given the same x get identical parameters, and calling it
        again with the same x reproduces the same parameters."""
        with frozen(self):
            self._walk(x, init=True, prior=False)

    @property
    def initialized(self) -> bool:
        return all(bool(b.initialized) for _, _, b in self.blocks() if isinstance(b, ActNorm))

    # ----- bounds and diagnostics --------------------------------------------------------------
    def blocks(self) -> Iterator[tuple[int, str, FlowBlock]]:
        """(level index, name, block) for every bijective block, in forward order."""
        for index, level in enumerate(self.levels):
            yield from ((index, name, block) for name, block in zip(level.names, level.steps))

    def block_bounds(self) -> list[tuple[int, str, float, float]]:
        """(level index, name, L, L_inv) of every block: the per-block Lipschitz diagnostics."""
        with reuse_weights():  # the certificates of a conv its bounds share, once
            return [(index, name, *block.lipschitz_bound()) for index, name, block in self.blocks()]

    def factors(self) -> list[tuple[int, str, list[FlowBlock]]]:
        """(level index, name, blocks) of the factors the composed bound multiplies, in forward
        order: each run of consecutive per-position linear blocks (actnorm → 1×1 conv) as one
        factor named 'level0/step0/actnorm+conv', every other block alone."""
        out: list[tuple[int, str, list[FlowBlock]]] = []
        for index, level in enumerate(self.levels):
            linear_run = False  # whether out[-1] is a run of linear blocks of this level
            for name, block in zip(level.names, level.steps):
                linear = block.channel_matrix() is not None
                if linear and linear_run:
                    _, run_name, blocks = out[-1]
                    step, kind = name.split("/")[1:]
                    part = kind if run_name.split("/")[1] == step else f"{step}/{kind}"
                    out[-1] = (index, f"{run_name}+{part}", [*blocks, block])
                else:
                    out.append((index, name, [block]))
                linear_run = linear
        return out

    def bound_factors(
        self, factors: list[tuple[int, str, list[FlowBlock]]] | None = None
    ) -> list[tuple[int, str, float, float]]:
        """(level index, name, L, L_inv) of every factor of `factors()`, or of the given ones (a
        level at a time, say). A run of linear blocks is one c×c matrix M = M_k···M_1 applied at
        every position (plus a bias), so its exact bounds are σ_max(M) and 1/σ_min(M), at most
        the product of its blocks' bounds."""
        out = []
        with reuse_weights():  # the certificates of a conv its bounds share, once
            for index, name, blocks in self.factors() if factors is None else factors:
                if blocks[0].channel_matrix() is None:
                    out.append((index, name, *blocks[0].lipschitz_bound()))
                    continue
                matrix = blocks[0].channel_matrix()
                for block in blocks[1:]:
                    matrix = block.channel_matrix() @ matrix
                sigma = torch.linalg.svdvals(matrix)
                out.append((index, name, sigma.max().item(), (1 / sigma.min()).item()))
        return out

    def lipschitz_bound(
        self, factors: list[tuple[int, str, float, float]] | None = None
    ) -> tuple[float, float]:
        """Certified (L, L_inv) of x -> (z_0, ..., z_top): the product of the bounds of
        `bound_factors()` (docs/design.md §3.4); pass them if already computed.

        Blocks after the first split act on part of the coordinates and as the identity on the
        factored-out rest, so they contribute max(L_b, 1) (resp. max(L_inv_b, 1))."""
        lip, lip_inv = 1.0, 1.0
        for index, _, block_lip, block_lip_inv in factors or self.bound_factors():
            if index > 0:
                block_lip, block_lip_inv = max(block_lip, 1.0), max(block_lip_inv, 1.0)
            lip *= block_lip
            lip_inv *= block_lip_inv
        return lip, lip_inv

    def logdet_bound(self) -> tuple[float, float]:
        """Certified range of log|det J_f| per image: the sum of block ranges (tighter than
        ±D·ln L)."""
        lo = hi = 0.0
        with reuse_weights():
            for _, _, block in self.blocks():
                block_lo, block_hi = block.logdet_bound()
                lo, hi = lo + block_lo, hi + block_hi
        return lo, hi


def make_step(
    cfg: ModelConfig, shape: tuple[int, int, int], step: int
) -> list[tuple[str, FlowBlock]]:
    """One flow step's blocks, in order (see pipeline/flows/config.py)."""
    alpha = cfg.log_scale_bound
    blocks: list[tuple[str, FlowBlock]] = []
    if cfg.actnorm != "none":
        blocks.append(("actnorm", ActNorm(shape, alpha if cfg.actnorm == "bounded" else None)))
    if cfg.conv == "svd":
        blocks.append(("conv", InvConv1x1SVD(shape, alpha)))
    elif cfg.conv == "lu":
        blocks.append(("conv", InvConv1x1LU(shape)))
    if cfg.block == "residual":
        blocks.append(
            (
                "residual",
                ResidualBlock(
                    shape,
                    cfg.width,
                    coeff=cfg.residual_coeff,
                    terms=cfg.residual_terms,
                    logdet=cfg.residual_logdet,
                    tol=cfg.residual_tol,
                    max_iter=cfg.residual_max_iter,
                    spectral_method=cfg.spectral_method,
                ),
            )
        )
    elif cfg.coupling != "none":
        blocks.append(
            (
                "coupling",
                Coupling(
                    shape,
                    cfg.coupling,
                    cfg.width,
                    cfg.coupling_log_scale_bound,
                    cfg.affine_x_bound,
                    # without a 1x1 conv nothing mixes channels, so alternate the conditioning half
                    flip=cfg.conv == "none" and step % 2 == 1,
                    coeff=cfg.subnet_coeff if cfg.spectral_norm else None,
                    spectral_method=cfg.spectral_method,
                    scale_coeff=cfg.scale_coeff if cfg.spectral_norm else None,
                ),
            )
        )
    return blocks


def build_flow(cfg: ModelConfig, image_shape: tuple[int, int, int], n_bits: int) -> MultiScaleFlow:
    """The model described by `cfg` for (C, H, W) = `image_shape` images of `n_bits`-bit data."""
    c, h, w = image_shape
    scale = 2**cfg.levels
    if cfg.levels < 1 or cfg.steps < 0:
        raise ValueError(
            f"model.levels must be ≥ 1 and model.steps ≥ 0, got {cfg.levels}, {cfg.steps}"
        )
    if h % scale or w % scale:
        raise ValueError(
            f"image {h}x{w} is not divisible by 2^levels = {scale} (model.levels={cfg.levels}); "
            f"use at most {int(math.log2(math.gcd(h, w) & -math.gcd(h, w)))} levels"
        )
    for key in ("log_scale_bound", "coupling_log_scale_bound", "subnet_coeff", "scale_coeff"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"model.{key} must be > 0, got {getattr(cfg, key)}")
    return MultiScaleFlow(cfg, (c, h, w), n_bits)
