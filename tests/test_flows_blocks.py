"""Property tests over every flow block, in float64 on tiny shapes (docs/design.md §8.7, docs/design.md §3.4)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.flows import ActNorm, Coupling, InvConv1x1LU, InvConv1x1SVD, ResidualBlock
from pipeline.flows.lipschitz import converge_spectral_norms
from tests.conftest import assert_every_parameter_has_a_gradient, assert_save_load_reproduces

SHAPE = (4, 4, 4)  # (C, H, W): D = 64, so full Jacobians are cheap
D = 64
X_BOUND = 3.0  # test inputs satisfy the affine coupling's domain assumption |x|_∞ ≤ X_BOUND
EXACT_TOL = 1e-8

BLOCKS = {
    "actnorm_bounded": lambda: ActNorm(SHAPE, 2.0),
    "actnorm_unbounded": lambda: ActNorm(SHAPE, None),
    "conv_svd": lambda: InvConv1x1SVD(SHAPE, 2.0),
    "conv_lu": lambda: InvConv1x1LU(SHAPE),
    "coupling_additive": lambda: Coupling(SHAPE, "additive", 8, 2.0, X_BOUND),
    "coupling_additive_sn": lambda: Coupling(SHAPE, "additive", 8, 2.0, X_BOUND, coeff=0.9),
    "coupling_affine": lambda: Coupling(SHAPE, "affine", 8, 2.0, X_BOUND),
    "coupling_affine_flip_sn": lambda: Coupling(
        SHAPE, "affine", 8, 1.0, X_BOUND, flip=True, coeff=2.0
    ),
    "coupling_affine_exp": lambda: Coupling(SHAPE, "affine_exp", 8, 2.0, X_BOUND),
    # a box narrower than the test points, so both of its pieces are exercised
    "coupling_affine_box_fourier_sn": lambda: Coupling(
        SHAPE, "affine_box", 8, 1.0, 1.0, coeff=2.0, spectral_method="fourier", scale_coeff=0.5
    ),
    "residual_exact": lambda: ResidualBlock(SHAPE, 8, coeff=0.7, logdet="exact", tol=1e-12),
    "residual_hutchinson": lambda: ResidualBlock(SHAPE, 8, coeff=0.7, terms=6, tol=1e-12),
    "residual_exact_fourier_sn": lambda: ResidualBlock(
        SHAPE, 8, coeff=0.7, logdet="exact", tol=1e-12, spectral_method="fourier"
    ),
}
EXACT_LOGDET = [name for name in BLOCKS if name != "residual_hutchinson"]


def make_block(name: str, seed: int = 0) -> torch.nn.Module:
    """A float64 block with every parameter moved off its (often identity) init, in eval mode."""
    torch.manual_seed(seed)
    block = BLOCKS[name]().double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    converge_spectral_norms(block)
    return block.eval()


def points(n: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return X_BOUND * (2 * torch.rand(n, *SHAPE, dtype=torch.float64, generator=generator) - 1)


def jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """[B, D, D] Jacobians of a per-sample map (samples are independent)."""
    rows = [torch.autograd.functional.jacobian(lambda v: fn(v[None])[0].flatten(), xi) for xi in x]
    return torch.stack(rows).reshape(len(x), D, D)


@pytest.mark.parametrize("name", BLOCKS)
def test_inverse_round_trip(name):
    block = make_block(name)
    x = points()
    y, _ = block(x)
    x_back = block.inverse(y)
    # residual: the fixed-point error is ≤ c/(1-c)·tol, far below the exact blocks' tolerance here
    assert (x_back - x).abs().max().item() <= EXACT_TOL
    assert (block(x_back)[0] - y).abs().max().item() <= EXACT_TOL


@pytest.mark.parametrize("name", EXACT_LOGDET)
def test_logdet_equals_slogdet_of_jacobian(name):
    block = make_block(name)
    x = points()
    _, logdet = block(x)
    expected = torch.linalg.slogdet(jacobian(lambda v: block(v)[0], x)).logabsdet
    assert torch.allclose(logdet, expected, atol=EXACT_TOL, rtol=0), (logdet, expected)
    assert logdet.abs().min() > 1e-3 or name.startswith("coupling_additive")  # a non-trivial check


def test_hutchinson_unbiased_for_truncated_series_and_truncation_within_bound():
    """E[v^T J^k v] = tr(J^k): the mean of M estimates is within 4 standard errors of the truncated
    series computed from exact traces, and the truncated series is within the geometric tail bound
    D·c^{n+1}/((n+1)(1-c)) of the exact log-det."""
    block = make_block("residual_hutchinson")
    terms, m = block.terms, 4000
    x = points(1)
    jac = jacobian(block.g, x)[0]
    power, series = torch.eye(D, dtype=torch.float64), 0.0
    for k in range(1, terms + 1):
        power = power @ jac
        series += (-1) ** (k + 1) / k * torch.trace(power).item()
    torch.manual_seed(3)
    with torch.no_grad():
        estimates = block(x.expand(m, *SHAPE).contiguous())[1]
    mean, stderr = estimates.mean().item(), estimates.std().item() / math.sqrt(m)
    assert abs(mean - series) <= 4 * stderr, (mean, series, stderr)
    assert estimates.std() > 0  # the estimator is random, so this check has teeth
    lo, hi = block.logdet_bound()  # a guard holding every estimate to this range never misfires
    assert (estimates >= lo).all() and (estimates <= hi).all()
    exact = torch.linalg.slogdet(torch.eye(D, dtype=torch.float64) + jac).logabsdet.item()
    c = block.lip_g()
    assert abs(series - exact) <= D * c ** (terms + 1) / ((terms + 1) * (1 - c))


@pytest.mark.parametrize("name", BLOCKS)
def test_every_parameter_gets_a_gradient(name):
    block = make_block(name).train()
    y, logdet = block(points())
    (y.square().sum() + logdet.sum()).backward()
    assert_every_parameter_has_a_gradient(block)


@pytest.mark.parametrize("name", BLOCKS)
def test_save_load_gives_identical_output(name):
    x = points()

    def run(block):
        torch.manual_seed(7)  # the Hutchinson probe is random: same seed, same estimate
        return block(x)

    assert_save_load_reproduces(lambda seed: make_block(name, seed=seed), run)


@pytest.mark.parametrize("name", BLOCKS)
def test_certified_bounds_hold_at_random_points(name):
    block = make_block(name)
    x = points(4, seed=2)
    lip, lip_inv = block.lipschitz_bound()
    sigma = torch.linalg.svdvals(jacobian(lambda v: block(v)[0], x))
    assert sigma[:, 0].max().item() <= lip * (1 + 1e-9), (sigma[:, 0].max(), lip)
    inverse_norm = (1 / sigma[:, -1]).max().item()
    assert inverse_norm <= lip_inv * (1 + 1e-9), (inverse_norm, lip_inv)
    lo, hi = block.logdet_bound()
    logdet = torch.log(sigma).sum(1)
    assert (logdet >= lo - 1e-9).all() and (logdet <= hi + 1e-9).all(), (logdet, lo, hi)


def test_affine_box_certificate_needs_no_domain_assumption():
    """The boxed affine coupling's bound holds on all of R^D: at points far outside its box and
    outside any |x|_∞ bound, and with the log-det of the piece each coordinate falls in."""
    block = make_block("coupling_affine_box_fourier_sn")
    x = 20.0 * points(4, seed=3)
    lip, lip_inv = block.lipschitz_bound()
    sigma = torch.linalg.svdvals(jacobian(lambda v: block(v)[0], x))
    assert sigma[:, 0].max().item() <= lip * (1 + 1e-9)
    assert (1 / sigma[:, -1]).max().item() <= lip_inv * (1 + 1e-9)
    y, logdet = block(x)
    assert torch.allclose(logdet, torch.log(sigma).sum(1), atol=EXACT_TOL, rtol=0)
    assert (block.inverse(y) - x).abs().max().item() <= 1e-12 * x.abs().max().item()


def test_bounded_parameterisations_stay_within_alpha():
    """Bounded actnorm, SVD conv and affine coupling keep |log-scale| < α whatever the weights."""
    alpha = 2.0
    actnorm, conv = make_block("actnorm_bounded"), make_block("conv_svd")
    coupling = make_block("coupling_affine")
    with torch.no_grad():
        for p in [*actnorm.parameters(), *conv.parameters(), *coupling.parameters()]:
            p.mul_(1e3)
    for block in (actnorm, conv):
        lip, lip_inv = block.lipschitz_bound()
        assert lip <= math.exp(alpha) and lip_inv <= math.exp(alpha)
    _, logdet = coupling(points())
    assert logdet.abs().max() <= alpha * D / 2
    assert coupling.max_log_scale() <= alpha


def test_unbounded_baseline_blocks_can_leave_the_bound():
    """The LU conv and unbounded actnorm have no such limit: the stability study's baseline."""
    conv, actnorm = make_block("conv_lu"), make_block("actnorm_unbounded")
    with torch.no_grad():
        conv.log_s[0] = 10.0
        actnorm.theta[0] = -10.0
    assert conv.lipschitz_bound()[0] > math.exp(9) and actnorm.lipschitz_bound()[1] > math.exp(9)


def test_actnorm_data_init_is_explicit_deterministic_and_idempotent():
    torch.manual_seed(0)
    x = 0.2 * torch.randn(16, *SHAPE, dtype=torch.float64) + 0.3
    block = ActNorm(SHAPE, 2.0).double()
    block(x)
    assert not bool(block.initialized) and block.theta.abs().max() == 0  # forward never initialises
    block.initialize(x)
    y, _ = block(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64))
    state = {k: v.clone() for k, v in block.state_dict().items()}
    block.initialize(x)
    assert all(torch.equal(state[k], v) for k, v in block.state_dict().items())
    assert bool(block.initialized)


def test_actnorm_init_respects_the_bound():
    # unit variance would need a log-scale of ≈ 9.2 > α
    x = 1e-4 * torch.randn(8, *SHAPE, dtype=torch.float64)
    block = ActNorm(SHAPE, 2.0).double()
    block.initialize(x)
    assert block.log_scale().max() < 2.0 and block.log_scale().max() > 1.99


def test_residual_inverse_has_implicit_derivatives():
    """The fixed-point inverse differentiates as f⁻¹: ∂x/∂y = (I + J_g)⁻¹, and parameter gradients
    match those of a long unrolled (attached) iteration."""
    block = make_block("residual_exact")
    y = points(1)
    jac_inverse = jacobian(block.inverse, y)[0]
    x = block.inverse(y).detach()
    jac_forward = jacobian(lambda v: block(v)[0], x)[0]
    assert torch.allclose(jac_inverse @ jac_forward, torch.eye(D, dtype=torch.float64), atol=1e-9)
    weights = torch.randn(1, *SHAPE, dtype=torch.float64)
    (block.inverse(y) * weights).sum().backward()
    implicit = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    x = y.clone()
    for _ in range(200):
        x = y - block.g(x)
    (x * weights).sum().backward()
    for got, want in zip(implicit, [p.grad for p in block.parameters()], strict=True):
        assert torch.allclose(got, want, atol=1e-9, rtol=1e-7)


def test_residual_inverse_reports_convergence():
    block = make_block("residual_hutchinson")
    block.inverse(block(points())[0])
    assert 1 < block.last_inverse_iterations < block.max_iter
    assert block.last_inverse_step <= block.tol
    assert block.lip_g() < 1.0


def test_spectral_normalisation_under_expansion_pressure():
    """MLE rewards expansion (docs/design.md §3.3): maximising log-det pushes Lip(g) up. Exact normalisation
    keeps the certified Lip(g) ≤ c in training."""
    torch.manual_seed(0)
    block = ResidualBlock(SHAPE, 8, coeff=0.9, terms=4, spectral_method="exact").double().train()
    optimizer = torch.optim.Adam(block.parameters(), lr=3e-2)
    x = points(8)
    for _ in range(40):
        loss = -block(x)[1].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert block.lip_g() <= 0.9 * (1 + 1e-9)


@pytest.mark.parametrize(
    "kernel, coeff, method",
    [(1, None, "exact"), (3, None, "exact"), (3, 0.8, "exact"), (3, 0.8, "fourier")],
)
def test_conv_certificates_bound_the_operator(kernel, coeff, method):
    """‖conv‖₂ ≤ operator_bound (exact for 1×1 kernels; the Fourier norm on the layer's H×W for
    3×3 ones, below the sqrt(k_h·k_w) bound), spectral normalisation reaches ≤ coeff (the Fourier
    method: the whole coeff), and sup_bound bounds |NN(x)| on the box |x|_∞ ≤ β (checked at random
    points and corners)."""
    from pipeline.flows.lipschitz import ConvNet, LipschitzConv2d

    torch.manual_seed(0)
    conv = LipschitzConv2d(3, 5, kernel, coeff=coeff, method=method, spatial=(5, 5)).double()
    with torch.no_grad():
        conv.weight.mul_(4.0)
    converge_spectral_norms(conv)
    conv.eval()
    x = torch.zeros(1, 3, 5, 5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: conv(v) - conv.bias.view(1, -1, 1, 1), x)
    norm = torch.linalg.matrix_norm(jac.reshape(5 * 25, 3 * 25), ord=2).item()
    bound = conv.operator_bound()
    assert norm <= bound * (1 + 1e-12)
    if kernel == 1:
        assert norm == pytest.approx(bound, rel=1e-9)
    else:
        gram = 3 * torch.linalg.matrix_norm(conv.effective_weight().flatten(1), ord=2).item()
        assert bound < gram / 1.2  # measured ~1.6x below here
        if coeff is not None and method == "exact":
            # what "exact" normalises, to the certificate's margin (spectral.certify)
            assert coeff / (1 + 2e-4) <= gram <= coeff * (1 + 1e-9)
    if coeff is not None:
        assert bound <= coeff * (1 + 1e-6)
    if method == "fourier":
        assert bound > 0.99 * coeff and norm > 0.8 * coeff  # the layer uses (nearly) all of it
    net = ConvNet(3, 4, 6, zero_init=False).double().eval()
    beta = 2.0
    sup = net.sup_bound((3, 5, 5), beta)
    box = beta * (2 * torch.rand(64, 3, 5, 5, dtype=torch.float64) - 1)
    box[:32] = beta * torch.sign(box[:32])
    with torch.no_grad():
        assert net(box).abs().max().item() <= sup
