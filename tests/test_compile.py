"""train.compile: the compiled model trains as the eager one does, and the key is a bool that a
resume may change only on purpose."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch._dynamo

from pipeline.config import ConfigError, load_config, save_config
from pipeline.flows import ModelConfig, build_flow
from pipeline.flows.config import PRESETS
from pipeline.train import compat
from pipeline.train.run import build_model

ROOT = Path(__file__).resolve().parent.parent
GLOW = PRESETS["glow"]
# fp32, Inductor's fused kernels against eager ones: rounding only (measured: losses equal,
# gradients ≤ 1e-8 apart at |g| ~ 1e-2); a wrong graph or a lost gradient is off by far more
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # no graphs or recompile counts carried over from another test
    yield
    torch._dynamo.reset()


def loss_and_grads(model: torch.nn.Module, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss = model(x)["bpd"].mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_adamw_steps_agree(eager, compiled, x, buffer: str | None = None, steps: int = 3):
    """`steps` AdamW steps of ``eager``; before each, the compiled copy's loss and gradients (and
    ``buffer``, which the forward updates: power-iteration vectors) equal eager's."""
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints unchanged
    optimizer = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    for _ in range(steps):
        loss, grads = loss_and_grads(eager, x)
        loss_c, grads_c = loss_and_grads(compiled, x)
        torch.testing.assert_close(loss_c, loss, rtol=RTOL, atol=ATOL)
        for name, grad in grads.items():
            assert grad is not None and grads_c[name] is not None, name
            torch.testing.assert_close(grads_c[name], grad, rtol=RTOL, atol=ATOL, msg=name)
        if buffer is not None:
            torch.testing.assert_close(compiled.state_dict()[buffer], eager.state_dict()[buffer])
        optimizer.step()
        # Adam divides by √v: a gradient that is 0 up to rounding (ActNorm's bias right after
        # its data init) steps by ±lr whatever its sign, so two optimizers would drift apart by
        # design; each step is compared from the same weights instead
        compiled.load_state_dict(eager.state_dict())


# The certified default's case is test_the_certified_default_compiles_into_one_graph below.
@pytest.mark.slow  # Inductor compiles the forward and backward graphs: 10-60 s each on a CPU core
@pytest.mark.parametrize(
    "keys",
    [GLOW, {"memory": "checkpoint", **GLOW}, {"memory": "invertible", **GLOW}],
    ids=["glow", "glow-checkpoint", "glow-invertible"],
)
def test_compiled_and_eager_adamw_steps_agree(keys):
    torch.manual_seed(0)
    eager = build_flow(ModelConfig(levels=2, steps=1, width=8, **keys), (3, 8, 8), n_bits=5)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) - 0.5
    eager.data_init(x)
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=False)
    assert_adamw_steps_agree(eager, compiled, x)


def test_the_key_is_a_bool_off_by_default_and_build_model_compiles_in_place():
    assert load_config(ROOT / "configs/debug.yaml").train.compile is False
    with pytest.raises(ConfigError, match=r"train\.compile = 'model' .*bool"):
        load_config(None, ["train.compile=model"])
    cfg = load_config(ROOT / "configs/debug.yaml", ["train.compile=true"])
    model = build_model(cfg)
    # compiled lazily on the first call; parameter names (checkpoint keys) stay the eager ones
    assert model._compiled_call_impl is not None
    assert not any(name.startswith("_orig_mod") for name in model.state_dict())


def test_turning_compile_on_at_resume_needs_allow_changed(tmp_path):
    save_config(load_config(ROOT / "configs/debug.yaml"), tmp_path / "config.yaml")
    cfg = load_config(ROOT / "configs/debug.yaml", ["train.compile=true"])
    with pytest.raises(ConfigError, match=r"train\.compile: False -> True.*allow_changed"):
        compat.check_resume(tmp_path, cfg, world_size=1, saved_world_size=1)
    allowed = load_config(
        ROOT / "configs/debug.yaml", ["train.compile=true", "train.allow_changed=train.compile"]
    )
    changed = compat.check_resume(tmp_path, allowed, world_size=1, saved_world_size=1)
    assert "train.compile: False -> True" in changed


def eager_and_compiled():
    """The certified default, data-initialised, and a copy compiled with fullgraph=True (a graph
    break raises), in place as build_model compiles; and the batch."""
    torch.manual_seed(0)
    eager = build_flow(ModelConfig(levels=2, steps=2, width=8), (3, 8, 8), n_bits=5)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) - 0.5
    eager.data_init(x)
    compiled = copy.deepcopy(eager)
    compiled.compile(fullgraph=True, dynamic=False)
    return eager, compiled, x


@pytest.mark.slow  # Inductor compiles the forward and backward graphs: ~1 min on a CPU core
def test_the_certified_default_compiles_into_one_graph():
    """The certified normalisation makes no host synchronisation and no branch on tensor values
    (spectral.certify, lipschitz.group_top): fullgraph=True compiles the default's whole forward
    (a graph break raises), in place as build_model compiles, and its AdamW steps agree with the
    eager ones, power-iteration vectors included (from the second step on: warm, as in training).
    One compile for both claims: Inductor takes about a minute per model here."""
    eager, compiled, x = eager_and_compiled()
    assert_adamw_steps_agree(
        eager, compiled, x, buffer="levels.0.steps.2.net.layers.0.spectral_vectors"
    )


@pytest.mark.slow  # Inductor compiles the forward and backward graphs: ~1 min on a CPU core
def test_a_held_step_compiles_into_one_graph_and_agrees_with_eager():
    """Under a held normalisation (train/certificate.py) the step's scales enter the compiled
    forward as inputs: fullgraph=True compiles it, the micro-batches before the last (a leaf's
    scales) and the last (joined to the weights) run the same graph, and the step's gradients
    agree with eager's."""
    torch._dynamo.utils.counters.clear()  # the graphs of this test alone
    eager, compiled, x = eager_and_compiled()
    grads = []
    for model in (eager, compiled):
        model.zero_grad(set_to_none=True)
        with model.hold_normalisation(2) as hold:
            for micro, chunk in enumerate(x.chunk(2)):
                hold.enter(micro)
                (model(chunk)["bpd"].mean() / 2).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert grad is not None and grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], grad, rtol=RTOL, atol=ATOL, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
