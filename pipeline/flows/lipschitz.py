"""Convolutions with a certified operator-norm bound, spectral normalisation, and subnets.

A spectral-normalised conv uses the kernel W·c/max(c, σ̂), σ̂ a certified upper bound on the
conv's operator norm recomputed from W at every training forward, so ‖conv‖₂ ≤ c holds by
construction (Miyato et al. 2018; as i-ResNet, Behrmann et al. 2019). The normalisers
(`Normaliser`; their linear algebra, and the derivations, in spectral.py):

- `FourierNormaliser` (spectral_method=fourier, k×k kernels): σ̂ = the norm of the conv's symbol
  on the torus of the layer's H×W (exact) or, where that has more frequencies, on a fixed 32×32
  grid times a proven inflation (≤ 2% on σ for 3×3): the cost no longer grows with the image. The
  layer may use all of its budget c, to within that margin;
- `MatrixNormaliser` (1×1 kernels; spectral_method=exact for k×k): σ̂ = sqrt(k_h·k_w)·‖W_mat‖₂,
  W_mat the [c_out, c_in·k_h·k_w] reshaped kernel (each input pixel enters k_h·k_w patches), exact
  for 1×1 kernels; for a 3×3 layer it leaves the true norm anywhere between c/3 and c.

Both normalisers keep warm-start vectors as buffers (saved with checkpoints, so a
resume is exact), take one power step per training forward, and certify with one batched
Cholesky test (spectral.certify): no host synchronisation, no data-dependent Python branch. The
subnets of all couplings of a level have the same shapes: `normalise_groups` normalises each
conv position of a level in one batched computation (`spectral_groups`), once per walk.

Training holds the normalisation for an optimizer step (`HeldNormalisation`, via
MultiScaleFlow.hold_normalisation): certified once per step (one power step per step), used by
every micro-batch, its gradient through the scales applied once; data-parallel ranks may split
the certificates (`Share`) and hand them on in one collective, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from pipeline.flows import spectral
from pipeline.flows.base import NoGradCache, compute_dtype, frozen, in_reuse_scope

# the basis size of MatrixNormaliser's subspace iteration (wide 1×1 convs: near-equal top values)
SUBSPACE = 8


class Top(NamedTuple):
    """The autograd-free part of a batch of normalisations: the direction the differentiable
    Rayleigh quotient is taken at (phases z [B, T] of the best frequency, None for a matrix;
    vector e [B, m]) and factor [B] = certified λ / the quotient there, so that quotient × factor
    is the certified σ̂² with the top eigenvalue's gradient."""

    z: torch.Tensor | None
    e: torch.Tensor
    factor: torch.Tensor


class Normaliser:
    """Computes σ̂² for a batch of same-shaped kernels: `top` without autograd (advancing the
    warm-start vectors), then `sigma_sq` differentiably. `overlap` multiplies σ̂ in the scale."""

    overlap = 1.0
    inflation = 1.0  # the certified bound's factor over the quotient's frequency set
    state_shape: tuple[int, ...] = ()
    name = ""
    subspace = False  # warm-start vectors: one per frequency, or a basis of k (subspace_step)

    def grams(self, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma_sq(self, weights: torch.Tensor, top: Top) -> torch.Tensor:
        raise NotImplementedError

    def _phases(self, best: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        return None

    def iterate(
        self, grams: torch.Tensor, vectors: torch.Tensor, warmup: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(v, v_top, quotients, following) for [B, F, m, m] Grams and [B, F, m(, 2)] vectors: v
        the vectors to start from (if cold: the exact top eigenvectors), then one power step
        (spectral.power_step or subspace_step) with the Rayleigh quotients [B, F] at v_top."""
        v = vectors.to(grams.real.dtype)
        if v.shape[-1] == 2 and grams.is_complex():
            v = torch.view_as_complex(v.contiguous())
        if warmup:  # exact top eigenvectors, once (of finite Grams: NaN weights give a NaN layer)
            finite = torch.where(torch.isfinite(grams), grams, torch.zeros_like(grams))
            top_k = torch.linalg.eigh(finite)[1].flip(-1)[..., : v.shape[-1]]
            # contiguous, as a loaded buffer is: the same BLAS path, bit for bit
            v = (top_k if self.subspace else top_k[..., 0]).contiguous()
        step = spectral.subspace_step if self.subspace else spectral.power_step
        return v, *step(grams, v)

    def top(
        self, weights: torch.Tensor, vectors: torch.Tensor, warmup: bool, update: bool
    ) -> tuple[Top, torch.Tensor]:
        """(Top, the vectors to keep) for [B, ...] detached kernels and [B, F, m(, 2)] vectors:
        warm them (if cold: exact eigenvectors), one power step, the Rayleigh quotients there,
        certify the best frequency's; the vectors to keep are one step further (if `update`;
        else unchanged, so evaluation forms the kernel that training formed). The stages are
        named for profiles (bench peer --split)."""
        with record_function("spectral_norm/grams"):
            grams = self.grams(weights)  # [B, F, m, m]
        with record_function("spectral_norm/power"):
            v, v_top, quotients, following = self.iterate(grams, vectors, warmup)
            best = quotients.argmax(-1)
            lower = quotients.gather(-1, best[:, None])[:, 0]
            e = v_top.gather(1, best[:, None, None].expand(-1, 1, v_top.shape[-1]))[:, 0]
            kept = following if update else v
        with record_function("spectral_norm/certify"):
            bound = spectral.certify(grams, lower, at_failures=spectral.CANDIDATES)
            bound = bound * self.inflation
            # a zero kernel: quotient 0 and bound 0, any factor gives σ̂ = 0
            factor = torch.where(lower > 0, bound / lower.clamp_min(1e-30), torch.ones_like(lower))
        if kept.is_complex():
            kept = torch.view_as_real(kept)
        return Top(self._phases(best, weights), e, factor), kept


class FourierNormaliser(Normaliser):
    """σ̂² = the certified top of the kernel's symbol on spectral.frequencies(kernel, spatial)."""

    name = "fourier"

    def __init__(self, shape: tuple[int, int, int, int], spatial: tuple[int, int]):
        c_out, c_in, k_h, k_w = shape
        self.kernel_size = (k_h, k_w)
        self.freq = spectral.frequencies(self.kernel_size, spatial)
        self.inflation = self.freq.inflation
        self.state_shape = (self.freq.count, min(c_out, c_in), 2)

    def grams(self, weights: torch.Tensor) -> torch.Tensor:
        return spectral.symbol_grams(weights, self.freq)

    def _phases(self, best: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        phases = spectral.tap_phases(self.kernel_size, self.freq, weights.dtype, weights.device)
        return phases[best]

    def sigma_sq(self, weights: torch.Tensor, top: Top) -> torch.Tensor:
        return spectral.rayleigh(spectral.symbol(weights, top.z), top.e) * top.factor

    def certificate_sq(self, kernel: torch.Tensor) -> float:
        return spectral.symbol_top(kernel, self.freq).item()


class MatrixNormaliser(Normaliser):
    """σ̂² = ‖W_mat‖₂², W_mat = [c_out, c_in·k_h·k_w], with `overlap` = sqrt(k_h·k_w)."""

    name = "matrix"

    def __init__(self, shape: tuple[int, int, int, int]):
        c_out, c_in, k_h, k_w = shape
        self.overlap = math.sqrt(k_h * k_w)
        m = min(c_out, c_in * k_h * k_w)
        self.subspace = m > 1
        self.state_shape = (1, m, min(SUBSPACE, m)) if self.subspace else (1, m)  # 1 "frequency"

    def grams(self, weights: torch.Tensor) -> torch.Tensor:
        return spectral.matrix_gram(weights.flatten(-3))[:, None]  # one "frequency"

    def sigma_sq(self, weights: torch.Tensor, top: Top) -> torch.Tensor:
        return spectral.rayleigh(spectral.matrix_side(weights.flatten(-3)), top.e) * top.factor

    def certificate_sq(self, kernel: torch.Tensor) -> float:
        w_mat = kernel.flatten(-3)
        return torch.linalg.eigvalsh(spectral.matrix_gram(w_mat))[-1].clamp_min(0.0).item()


def make_normaliser(
    method: str, shape: tuple[int, int, int, int], spatial: tuple[int, int] | None
) -> Normaliser:
    if method == "fourier" and shape[2:] != (1, 1):
        return FourierNormaliser(shape, spatial)
    return MatrixNormaliser(shape)  # a 1×1 kernel is the same matrix at every frequency


class LipSwish(nn.Module):
    """x·sigmoid(βx)/1.1, learnable β > 0: smooth and Lip ≤ 1 (Chen et al. 2019, Residual Flows)."""

    def __init__(self):
        super().__init__()
        # shape (1,), not a 0-d tensor: DeepSpeed broadcasts parameters as byte views at start-up,
        # which a 0-d tensor cannot give
        self.beta_raw = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = F.softplus(self.beta_raw)
        return x * torch.sigmoid(beta * x) / 1.1


class LipschitzConv2d(nn.Conv2d):
    """A 'same' conv2d that reports a certified bound on its operator norm; spectral-normalised to
    ‖conv‖₂ ≤ coeff when coeff is given, by `method`'s normaliser (see the module docstring):
    "fourier" (the symbol's norm: the layer may use all of its budget) or "exact" (sqrt(k_h·k_w)·
    ‖W_mat‖₂).

    The normalised kernel comes from the scale held for the optimizer step (`HeldNormalisation`),
    else from the scale its level prepared for the current walk (`normalise_groups` sets it,
    `release_groups` clears it), else from its own normalisation.

    One cache (`_cache`, a base.NoGradCache) with one expiry rule: a value derived from the
    weights without autograd — its own normalisation's autograd-free part (`Top`) and kernel, its
    level's batched scales (held by the group's first conv), its certificates (`operator_bound`)
    — is reused only inside the `reuse_weights` scope it was computed in, while the weight keeps
    its storage and version; outside a scope, or while autograd records, every call computes.
    So a re-run of an invertible or checkpointed step normalises with the forward pass's `Top`
    (the warm-start vectors have moved on since), and the sampler check's walks, a fixed-point
    solve or a model's certificates normalise once. Scopes, not version counters alone, decide:
    DeepSpeed ZeRO updates weights without bumping their versions.

    The warm-start vectors are cold until first used (then the exact top eigenvectors are
    taken): `spectral_warm` is the flag as checkpoints save it, `_warm` its host copy, read at
    every normalisation without a device sync.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int,
        coeff: float | None = None,
        method: Literal["exact", "fourier"] = "exact",
        zero_init: bool = False,
        spatial: tuple[int, int] | None = None,
    ):
        super().__init__(c_in, c_out, kernel_size, padding=kernel_size // 2)
        if method == "fourier" and coeff is not None and spatial is None:
            raise ValueError("spectral_method=fourier needs the layer's spatial size")
        self.coeff = coeff
        self.method = method
        self.spatial = None if spatial is None else tuple(spatial)
        self.overlap = math.sqrt(kernel_size * kernel_size)  # taps per input pixel, square-rooted
        self.normaliser = None
        if coeff is not None:
            self.normaliser = make_normaliser(method, tuple(self.weight.shape), self.spatial)
        self._cache = NoGradCache()
        self._prepared: torch.Tensor | None = None  # the scale of the current walk, if any
        self._held: torch.Tensor | None = None  # the scale of the current optimizer step, if held
        self._warm = False  # whether spectral_vectors track the current weights
        if zero_init:
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)
        if self.normaliser is not None:
            # deterministic (every rank builds the same), not drawn from the global generator
            shape = self.normaliser.state_shape
            start = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            if isinstance(self.normaliser, FourierNormaliser):  # [F, m, (re, im)]
                start = torch.view_as_real(F.normalize(torch.view_as_complex(start), dim=-1))
            elif self.normaliser.subspace:  # [1, m, k], orthonormal columns
                start = torch.linalg.qr(start).Q
            else:
                start = F.normalize(start, dim=-1)
            self.register_buffer("spectral_vectors", start)
            # 1 once the vectors track the weights (a checkpoint of a layer never run stays cold);
            # shape (1,): DeepSpeed broadcasts buffers as byte views, which a 0-d tensor cannot give
            self.register_buffer("spectral_warm", torch.zeros(1))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *rest):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *rest)
        if self.normaliser is not None:
            # loading is no training step: reading the flag here costs no per-step host sync. A
            # checkpoint from before the vectors existed loads cold: warmed up at the first use
            warm = state_dict.get(prefix + "spectral_warm")
            self._warm = warm is not None and bool(warm.reshape(-1)[0].item())
            for key in ("spectral_vectors", "spectral_warm"):
                if prefix + key in missing:
                    missing.remove(prefix + key)

    def effective_weight(self, update: bool | None = None) -> torch.Tensor:
        """The kernel actually used, W·coeff/max(coeff, overlap·σ̂). The warm-start vectors
        advance only in training mode, or when asked."""
        if self.coeff is None:
            return self.weight
        if self._held is not None:
            return self.weight * self._held.to(self.weight.dtype)
        if self._prepared is not None:
            return self.weight * self._prepared.to(self.weight.dtype)
        updating = self.training if update is None else update
        # grad mode first (no graph break under torch.compile)
        if not torch.is_grad_enabled() and in_reuse_scope():
            return self._cache.get("weight", [self.weight], lambda: self._normalised(updating))
        return self._normalised(updating)

    def _normalised(self, updating: bool) -> torch.Tensor:
        with torch.no_grad():
            top = self._cache.get("top", [self.weight], lambda: group_top([self], updating))
        return self.weight * group_scales([self], top)[0].to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    @torch.no_grad()
    def operator_bound(self, rows: slice = slice(None)) -> float:
        """Certified ‖conv‖₂ restricted to output channels `rows`: the smaller of sqrt(k_h·k_w)·
        ‖W_mat[rows]‖₂ (float64 eigensolve) and, where the layer knows its H×W, the symbol's norm
        on its torus or grid (spectral.symbol_top, all eigenvalues, float64). Zero rows (a
        zero-initialised last layer) are 0 at any scale, so they are not normalised first (that
        would warm up a layer never run: eigendecompositions at every frequency)."""

        def bound() -> float:
            if not self.weight[rows].any():
                return 0.0
            kernel = self.effective_weight(update=False)[rows].double()
            bound = self.overlap * math.sqrt(MatrixNormaliser(kernel.shape).certificate_sq(kernel))
            if self.spatial is not None and self.kernel_size != (1, 1):
                fourier = FourierNormaliser(tuple(kernel.shape), self.spatial)
                bound = min(bound, math.sqrt(fourier.certificate_sq(kernel)))
            return bound

        # the eigensolves dominate a model's certificate: the convs its bounds share (a
        # coupling's first two, for its scale and its shift) certify once per scope
        return self._cache.get(f"bound{rows.start}:{rows.stop}", [self.weight], bound)

    @torch.no_grad()
    def inf_bound(self, rows: slice = slice(None)) -> float:
        """‖conv‖_∞→∞ ≤ max over the output channels `rows` of Σ |kernel| (the ∞-norm bound)."""
        w_mat = self.effective_weight(update=False).flatten(1)[rows].double()
        if w_mat.numel() == 0:
            return 0.0
        return w_mat.abs().sum(1).max().item()


class ConvNet(nn.Module):
    """conv3×3 → act → conv1×1 → act → conv3×3: Glow's coupling NN (its last layer zero-initialised,
    so each coupling starts as the identity) and, with LipSwish, the residual g of Residual Flows.

    Lip ≤ Π_layers ‖conv‖₂ (activations are 1-Lipschitz); `lipschitz_bound(rows)` certifies it for a
    subset of output channels. With coeff, each layer is normalised to coeff^(1/3). `spatial`, the
    H×W the net acts on, lets the layers certify (and, method "fourier", normalise) exactly.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        width: int,
        coeff: float | None = None,
        activation: str = "relu",
        zero_init: bool = True,
        method: Literal["exact", "fourier"] = "exact",
        spatial: tuple[int, int] | None = None,
    ):
        super().__init__()
        layer_coeff = None if coeff is None else coeff ** (1.0 / 3.0)

        def act() -> nn.Module:
            return nn.ReLU() if activation == "relu" else LipSwish()

        def conv(c_from: int, c_to: int, kernel: int, zero: bool = False) -> LipschitzConv2d:
            return LipschitzConv2d(c_from, c_to, kernel, layer_coeff, method, zero, spatial)

        self.layers = nn.Sequential(
            conv(c_in, width, 3),
            act(),
            conv(width, width, 1),
            act(),
            conv(width, c_out, 3, zero_init),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last is the native conv layout of oneDNN (CPU) and of cuDNN's tensor-core
        # kernels: given NCHW, every conv call, forward and backward, reorders (copies) its
        # tensors into it and back.
        return self.layers(x.contiguous(memory_format=torch.channels_last)).contiguous()

    def lipschitz_bound(self, rows: slice = slice(None)) -> float:
        """Certified Lip (ℓ2) of the output channels `rows`: the product of layer operator norms.
        A zero last layer (as initialised) makes them a constant map: 0, without the other
        layers' certificates (minutes for a 1024² model as built) unless their weights are not
        finite."""
        convs = [m for m in self.layers if isinstance(m, LipschitzConv2d)]
        bound = convs[-1].operator_bound(rows)
        if bound == 0 and all(bool(conv.weight.isfinite().all()) for conv in convs[:-1]):
            return 0.0
        for conv in convs[:-1]:
            bound *= conv.operator_bound()
        return bound

    @torch.no_grad()
    def sup_bound(
        self, shape: tuple[int, int, int], x_bound: float, rows: slice = slice(None)
    ) -> float:
        """Certified sup |NN(x)[rows]| over inputs of `shape` with |x|_∞ ≤ x_bound:
        |NN(0)|_∞ + x_bound·Π ‖conv‖_∞→∞ (activations are 1-Lipschitz in every norm). On the zero
        image the first two layers output constants (their biases), so NN(0) varies with position
        only through which taps of the last 3×3 conv fall inside the image; a zero image of
        min(H, 3)×min(W, 3) pixels shows every such case."""
        convs = [m for m in self.layers if isinstance(m, LipschitzConv2d)]
        lip_inf = convs[-1].inf_bound(rows)
        for conv in convs[:-1]:
            lip_inf *= conv.inf_bound()
        c, h, w = shape
        param = convs[0].weight
        with frozen(self):
            zero = torch.zeros(1, c, min(h, 3), min(w, 3), dtype=param.dtype, device=param.device)
            at_zero = self(zero)[:, rows].abs().max().item()
        return at_zero + x_bound * lip_inf


def group_top(convs: list[LipschitzConv2d], update: bool) -> Top:
    """The autograd-free part of normalising same-shaped convs together (one batched grams,
    power step and Cholesky test); advances their warm-start vectors if `update` (or if cold)."""
    normaliser = convs[0].normaliser
    with torch.no_grad(), torch.autocast(convs[0].weight.device.type, enabled=False):
        weights = torch.stack([c.weight.detach() for c in convs])
        weights = weights.to(compute_dtype(weights))
        vectors = torch.stack([c.spectral_vectors for c in convs])
        warmup = not all(c._warm for c in convs)
        top, kept = normaliser.top(weights, vectors, warmup, update)
        if update or warmup:
            for conv, vector in zip(convs, kept.unbind(0), strict=True):
                conv.spectral_vectors.copy_(vector)
                conv.spectral_warm.fill_(1.0)
                conv._warm = True
    return top


def group_scales(convs: list[LipschitzConv2d], top: Top) -> torch.Tensor:
    """[B]: coeff/max(coeff, overlap·σ̂) for each conv, differentiable in the weights, computed
    (at least) in fp32 even under autocast."""
    first = convs[0]
    with (
        record_function("spectral_norm/scales"),
        torch.autocast(first.weight.device.type, enabled=False),
    ):
        weights = torch.stack([c.weight for c in convs])
        weights = weights.to(compute_dtype(weights))
        sigma_sq = first.normaliser.sigma_sq(weights, top)
        # compare squares: no sqrt of 0 (a zero-initialised kernel) in the backward pass
        bound_sq = torch.clamp_min(first.normaliser.overlap**2 * sigma_sq, first.coeff**2)
        return first.coeff / torch.sqrt(bound_sq)


def spectral_groups(module: nn.Module) -> list[list[LipschitzConv2d]]:
    """The certified-normalised convs of `module`, grouped so that each group can be normalised
    in one batched computation: same normaliser, kernel shape, H×W and coeff (in a level: one
    group per conv position of its coupling subnets)."""
    groups: dict[tuple, list[LipschitzConv2d]] = {}
    for conv in module.modules():
        if isinstance(conv, LipschitzConv2d) and conv.normaliser is not None:
            key = (conv.normaliser.name, tuple(conv.weight.shape), conv.spatial, conv.coeff)
            groups.setdefault(key, []).append(conv)
    return list(groups.values())


def normalise_groups(groups: list[list[LipschitzConv2d]]) -> None:
    """Prepare every conv's scale for one walk, a group at a time (one batched normalisation per
    level and conv position); `release_groups` ends the walk. With autograd the scales carry
    the graph to the weights, built once for the group; in eval mode without autograd, walks
    within one `reuse_weights` scope (the sampler check's forward, encode, decode and sample)
    share them."""
    for convs in groups:
        if convs[0]._held is not None:  # the optimizer step's scales (HeldNormalisation)
            continue
        updating = convs[0].training

        def scales(convs=convs, updating=updating) -> torch.Tensor:
            return group_scales(convs, group_top(convs, updating))

        if updating:  # a training walk: the warm-start vectors move, nothing to reuse
            prepared = scales()
        else:  # fixed weights and vectors: once per reuse_weights scope without autograd
            prepared = convs[0]._cache.get("group", [c.weight for c in convs], scales)
        for conv, scale in zip(convs, prepared.unbind(0), strict=True):
            conv._prepared = scale


def release_groups(groups: list[list[LipschitzConv2d]]) -> None:
    for convs in groups:
        for conv in convs:
            conv._prepared = None


@torch.no_grad()
def converge_spectral_norms(module: nn.Module) -> None:
    """Mark every normalised conv of `module` cold (after editing weights by hand, or before
    certifying a model whose warm-start vectors lag its weights): its next use starts from the
    exact top eigenvectors."""
    for conv in module.modules():
        if isinstance(conv, LipschitzConv2d) and conv.normaliser is not None:
            conv._warm = False
            conv.spectral_warm.zero_()


# --- the normalisation of one optimizer step -------------------------------------------------------


class Share(NamedTuple):
    """How data-parallel ranks split a step's certificates: `units[j]` = (group, start, stop), the
    convs group[start:stop], is certified by rank `owners[j]` (this is rank `rank`), and `gather`
    maps this rank's flat buffer [n] to every rank's, [R, n], in one collective (the train side
    passes it in: flows/ holds no distributed code). The units of a group cover it in order."""

    units: list[tuple[int, int, int]]
    owners: list[int]
    rank: int
    gather: Callable[[torch.Tensor], torch.Tensor]


def group_cost(convs: list[LipschitzConv2d]) -> float:
    """The certificate's multiply-adds for a group, from shapes: per frequency the Gram
    (c_out·c_in·taps·m) and the Cholesky ladder (~m³)."""
    normaliser = convs[0].normaliser
    c_out, c_in, k_h, k_w = convs[0].weight.shape
    n_freq, m = normaliser.state_shape[:2]
    return len(convs) * n_freq * (c_out * c_in * k_h * k_w * m + m**3)


def top_layout(convs: list[LipschitzConv2d]) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, complex) of what a group's certificate hands on, in order: the phases z [B, T]
    (Fourier only), the direction e [B, m], the factor [B] and the warm-start vectors to keep
    [B, *state_shape]: everything a rank needs to form the group's scales and to hold the
    vectors the certificate's owner holds."""
    normaliser, b = convs[0].normaliser, len(convs)
    fourier = isinstance(normaliser, FourierNormaliser)
    layout = [((b, normaliser.state_shape[1]), fourier), ((b,), False)]
    layout.append(((b, *normaliser.state_shape), False))
    if fourier:
        taps = normaliser.kernel_size[0] * normaliser.kernel_size[1]
        layout.insert(0, ((b, taps), True))
    return layout


def top_numel(convs: list[LipschitzConv2d]) -> int:
    """Real scalars of `top_layout` (a complex one counts twice)."""
    return sum(math.prod(shape) * (2 if cplx else 1) for shape, cplx in top_layout(convs))


def _pack(convs: list[LipschitzConv2d], top: Top, dtype: torch.dtype) -> torch.Tensor:
    vectors = torch.stack([c.spectral_vectors for c in convs])
    pieces = [top.e, top.factor, vectors] if top.z is None else [top.z, top.e, top.factor, vectors]
    real = [torch.view_as_real(p) if p.is_complex() else p for p in pieces]
    return torch.cat([p.to(dtype).reshape(-1) for p in real])


def _unpack(convs: list[LipschitzConv2d], flat: torch.Tensor) -> Top:
    """The Top a group's owner packed; the owner's vectors become this rank's, bit for bit."""
    pieces, offset = [], 0
    for shape, cplx in top_layout(convs):
        n = math.prod(shape) * (2 if cplx else 1)
        piece = flat[offset : offset + n].clone()  # aligned for view_as_complex, not aliased
        offset += n
        pieces.append(
            torch.view_as_complex(piece.reshape(*shape, 2)) if cplx else piece.reshape(shape)
        )
    *top, vectors = pieces
    for conv, vector in zip(convs, vectors.unbind(0), strict=True):
        conv.spectral_vectors.copy_(vector)
        conv.spectral_warm.fill_(1.0)
        conv._warm = True
    return Top(top[0] if len(top) == 3 else None, *top[-2:])


def certify_groups(groups: list[list[LipschitzConv2d]], share: Share | None = None) -> list[Top]:
    """Each group's `group_top`, advancing its warm-start vectors: all on this rank, or, with
    `share`, this rank's units (groups or slices of them), then one `share.gather` of the flat
    buffer [Σ top_numel] of each rank's units (padded to the largest), from which every rank
    takes the other units' Tops and vectors. Computed by the owner alone and copied, every rank's
    are bit for bit those of the unshared computation (each conv's certificate is its own: a
    slice of a batch gives the slice of its results)."""
    if share is None or not groups:
        return [group_top(convs, update=True) for convs in groups]
    dtype = compute_dtype(groups[0][0].weight)
    device = groups[0][0].weight.device
    units = [groups[g][start:stop] for g, start, stop in share.units]
    tops: list[Top | None] = [None] * len(units)
    owned = []
    with torch.no_grad():
        for j, convs in enumerate(units):
            if share.owners[j] == share.rank:
                tops[j] = group_top(convs, update=True)
                owned.append(_pack(convs, tops[j], dtype))
        sizes = [0] * (max(share.owners) + 1)
        for j, convs in enumerate(units):
            sizes[share.owners[j]] += top_numel(convs)
        flat = torch.zeros(max(sizes), dtype=dtype, device=device)
        if owned:
            mine = torch.cat(owned)
            flat[: len(mine)] = mine
        rows = share.gather(flat)
        offsets = [0] * len(rows)
        for j, convs in enumerate(units):
            owner, n = share.owners[j], top_numel(convs)
            if owner != share.rank:
                tops[j] = _unpack(convs, rows[owner, offsets[owner] : offsets[owner] + n])
            offsets[owner] += n
    by_group: list[list[Top]] = [[] for _ in groups]
    for (g, _, _), top in zip(share.units, tops, strict=True):
        by_group[g].append(top)
    return [_concat(parts) for parts in by_group]


def _concat(parts: list[Top]) -> Top:
    if len(parts) == 1:
        return parts[0]
    z = None if parts[0].z is None else torch.cat([p.z for p in parts])
    return Top(z, torch.cat([p.e for p in parts]), torch.cat([p.factor for p in parts]))


class _Join(torch.autograd.Function):
    """(scale with its graph to the weights, the step's leaf) -> the scale's values; backward: the
    last micro-batch's gradient plus the leaf's, accumulated over the step's earlier
    micro-batches, so that the graph to the weights is walked once per optimizer step."""

    @staticmethod
    def forward(ctx, scale: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        ctx.leaf = leaf
        return scale.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        earlier = ctx.leaf.grad
        return (grad if earlier is None else grad + earlier), None


class HeldNormalisation:
    """One optimizer step's normalisation, formed once and used by each of its `micro_batches`
    forward/backward passes (`enter(micro)` before each; `release` after the last backward, or
    leave the `with` block).

    At the hold, every group's Top is certified (`certify_groups`: the warm-start vectors advance
    once per step) and its scales [B] = `group_scales` computed with their graph to the weights.
    The micro-batches before the last use a detached leaf copy of the scales, whose .grad
    accumulates their gradients; the last uses the scales through `_Join`, whose backward adds
    the leaf's gradient: the scale's graph runs backward once, inside the step's last backward
    (before a data-parallel engine reduces the gradients at the accumulation boundary), and the
    step's gradient is that of one pass over all its micro-batches with this normalisation. One
    micro-batch uses the scales as they are: the cost of an unheld training walk.

    Every walk of the model while held normalises with these scales (LipschitzConv2d.
    effective_weight): the re-runs of `checkpoint` and `invertible` memory included, so they
    form the kernels their forward passes formed; the invertible run takes the held scales as
    inputs and returns their gradients (flows/memory.py)."""

    def __init__(self, groups, micro_batches: int, share: Share | None = None):
        if micro_batches < 1:
            raise ValueError(f"a held normalisation needs ≥ 1 micro-batch, got {micro_batches}")
        self.groups = groups
        self.micro_batches = micro_batches
        tops = certify_groups(groups, share)
        self.scales = [group_scales(convs, top) for convs, top in zip(groups, tops, strict=True)]
        self.leaves = None
        if micro_batches > 1:
            self.leaves = [scale.detach().requires_grad_(True) for scale in self.scales]

    def enter(self, micro: int) -> None:
        """Give every conv its scale for micro-batch `micro` (0-based) of the step."""
        if not 0 <= micro < self.micro_batches:
            raise ValueError(f"micro-batch {micro} of a step of {self.micro_batches}")
        for k, convs in enumerate(self.groups):
            scales = self.scales[k]
            if self.leaves is not None:
                leaf = self.leaves[k]
                last = micro == self.micro_batches - 1
                scales = _Join.apply(scales, leaf) if last else leaf
            for conv, scale in zip(convs, scales.unbind(0), strict=True):
                conv._held = scale

    def release(self) -> None:
        for convs in self.groups:
            for conv in convs:
                conv._held = None
        self.scales, self.leaves = [], None

    def __enter__(self) -> HeldNormalisation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def held_convs(modules) -> list[LipschitzConv2d]:
    """The convs of `modules` (and their submodules) that normalise with a held scale now."""
    return [
        m
        for module in modules
        for m in module.modules()
        if isinstance(m, LipschitzConv2d) and m._held is not None
    ]
