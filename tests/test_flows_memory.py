"""Memory modes of the backward pass (pipeline/flows/memory.py) and the no-grad weight caches.

Gradients are compared with store mode in float64 on the full multi-scale model; memory is
measured as the bytes autograd saves for backward (exact, deterministic), never by timing.
"""

from __future__ import annotations

import dataclasses
import json
import weakref

import pytest
import torch

from pipeline.bench.train import saved_tensor_bytes
from pipeline.flows import InvConv1x1LU, InvConv1x1SVD, ModelConfig, build_flow
from pipeline.flows.base import reuse_weights
from pipeline.flows.lipschitz import LipschitzConv2d, converge_spectral_norms
from pipeline.train.plan import LiveTensors
from tests.conftest import PYTHON, env_for_subprocess, run_main, run_together

IMAGE = (3, 8, 8)
N_BITS = 5
TINY = dict(levels=3, steps=2, width=8)  # three levels: 8² -> 4² -> 2² -> 1²
MODELS = {
    "glow_affine": ModelConfig(**TINY),
    # the re-run must not advance the warm-start vectors a second time
    "glow_additive_exact_sn": ModelConfig(
        **TINY, coupling="additive", spectral_norm=True, subnet_coeff=0.9, spectral_method="exact"
    ),
    "unconstrained_glow": ModelConfig(
        **TINY, coupling="affine_exp", conv="lu", actnorm="unbounded"
    ),
    "coupling_only_flipped": ModelConfig(**TINY, conv="none", actnorm="none"),
    # Hutchinson probes: checkpointing must replay the same random numbers
    "residual_hutchinson": ModelConfig(**TINY, block="residual", residual_coeff=0.7),
}
# measured |Δgrad| vs store: checkpoint 0 (bit-identical); invertible ≤ 1.1e-14 (float64)
GRAD_TOL = 1e-6


def data(n: int = 3, seed: int = 1, image=IMAGE, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 2**N_BITS, (n, *image), generator=g)
    return (k / 2**N_BITS - 0.5 + torch.rand(n, *image, generator=g) / 2**N_BITS).to(dtype)


def make_flow(cfg: ModelConfig, memory: str, image=IMAGE, dtype=torch.float64):
    """Identical weights for every memory mode: the mode does not touch construction."""
    torch.manual_seed(0)
    flow = build_flow(dataclasses.replace(cfg, memory=memory), image, N_BITS).to(dtype)
    flow.data_init(data(8, seed=9, image=image, dtype=dtype))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    converge_spectral_norms(flow)
    return flow.train()


def step(flow, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Loss and backward with every output used (each block's log-det weighted differently, so
    each one's gradient path counts); returns the loss and the bytes saved for backward."""
    torch.manual_seed(5)  # Hutchinson probes
    with saved_tensor_bytes([*flow.parameters(), *flow.buffers()]) as saved:
        out = flow(x, per_block=True)
    blocks = out["logdet_blocks"]
    weights = torch.linspace(-1.0, 1.0, blocks.numel(), dtype=blocks.dtype).reshape(blocks.shape)
    loss = out["bpd"].mean() + 1e-3 * (weights * blocks).sum()
    loss.backward()
    return loss.detach(), saved["bytes"]


@pytest.mark.parametrize("mode", ["checkpoint", "invertible"])
@pytest.mark.parametrize("name", MODELS)
def test_gradients_equal_store_mode(name, mode):
    results = {}
    for memory in ("store", mode):
        flow = make_flow(MODELS[name], memory)
        x = data().requires_grad_(True)
        loss, saved = step(flow, x)
        grads = {"x": x.grad, **{n: p.grad for n, p in flow.named_parameters()}}
        results[memory] = (loss, grads, dict(flow.named_buffers()), saved)
    (loss, grads, buffers, saved), (loss_m, grads_m, buffers_m, saved_m) = results.values()
    assert torch.allclose(loss_m, loss, rtol=0, atol=1e-12)
    for key, grad in grads.items():
        assert grads_m[key] is not None, key
        assert (grads_m[key] - grad).abs().max().item() <= GRAD_TOL, key
    for key, buffer in buffers.items():  # warm-start vectors advanced once per training forward
        assert torch.equal(buffers_m[key], buffer), key
    assert saved_m < saved / 2, (saved_m, saved)  # the mode really ran


def saved_bytes(memory: str, steps: int) -> int:
    cfg = ModelConfig(levels=2, steps=steps, width=16)
    flow = make_flow(cfg, memory, image=(3, 16, 16), dtype=torch.float32)
    with saved_tensor_bytes([*flow.parameters(), *flow.buffers()]) as saved:
        flow(data(4, image=(3, 16, 16), dtype=torch.float32))["bpd"].mean()
    return saved["bytes"]


def test_invertible_saved_bytes_do_not_grow_with_depth():
    """Measured (float32, 16², batch 4, 2 levels, width 16), steps per level 2 / 4 / 8:
    store 332 / 628 / 1218 kB; invertible 36.9 kB at every depth (each level's output, what the
    split priors and the top prior need)."""
    store = [saved_bytes("store", steps) for steps in (2, 4, 8)]
    invertible = [saved_bytes("invertible", steps) for steps in (2, 4, 8)]
    assert invertible[0] == invertible[1] == invertible[2], invertible
    assert store[2] > 3.5 * store[0], store  # store grows linearly with depth
    assert invertible[2] < store[2] / 30, (invertible, store)


class _Saved:
    """A saved tensor as autograd holds it: freed when the graph node that saved it lets go."""

    def __init__(self, t: torch.Tensor, on_free):
        self.t = t
        weakref.finalize(self, on_free)


def backward_peak_saved_bytes(memory: str, steps: int) -> int:
    """The most bytes autograd holds for backward at any moment of forward + backward, parameters
    and buffers left out: the invertible backward pass's re-runs are graphs of their own."""
    cfg = ModelConfig(levels=2, steps=steps, width=16)
    flow = make_flow(cfg, memory, image=(3, 16, 16), dtype=torch.float32)
    excluded = {t.untyped_storage().data_ptr() for t in [*flow.parameters(), *flow.buffers()]}
    holders: dict[int, list[int]] = {}  # storage -> [saves still held, bytes]
    live = {"bytes": 0, "peak": 0}

    def free(ptr: int) -> None:
        holders[ptr][0] -= 1
        if holders[ptr][0] == 0:
            live["bytes"] -= holders.pop(ptr)[1]

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in excluded:
            return t
        if ptr not in holders:
            holders[ptr] = [0, storage.nbytes()]
            live["bytes"] += storage.nbytes()
            live["peak"] = max(live["peak"], live["bytes"])
        holders[ptr][0] += 1
        return _Saved(t, lambda: free(ptr))

    def unpack(saved):
        return saved.t if isinstance(saved, _Saved) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        flow(data(4, image=(3, 16, 16), dtype=torch.float32))["bpd"].mean().backward()
    return live["peak"]


def test_invertible_backward_peak_does_not_grow_with_depth():
    """The backward pass re-runs an invertible run in segments of at most a flow step, each one
    graph: the peak of what autograd holds stays that of one segment (plus each level's output)
    at any depth. Measured (float32, 16², batch 4, 2 levels, width 16), steps per level 2 / 4 / 8:
    store 422 / 807 / 1578 kB; invertible 123 kB at every depth (one block per graph: 96 kB)."""
    store = [backward_peak_saved_bytes("store", steps) for steps in (2, 4, 8)]
    invertible = [backward_peak_saved_bytes("invertible", steps) for steps in (2, 4, 8)]
    assert invertible[0] == invertible[1] == invertible[2], invertible
    assert store[2] > 3.5 * store[0], store
    assert invertible[2] < store[2] / 5, (invertible, store)


def test_live_tensors_counts_allocations_and_tells_per_image_from_weights():
    """Bytes alive after each allocation, (other, per-image): a view or an in-place op allocates
    nothing, a freed tensor leaves the count, and only what is computed from the batch with the
    batch's rows is per-image (a weight-sized product of the batch stays "other")."""
    x = torch.zeros(5, 100)  # 400 B a row
    w = torch.zeros(100, 100, requires_grad=True)
    with LiveTensors([x], 5) as live:
        h = x @ w  # per-image, 2000 B
        h.add_(1).view(-1)  # nothing new
        (w * 2).sum()  # other: 40000 B, then its 4-byte sum; both freed at once
        live.mark()
        (x.t() @ h).sum()  # computed from the batch, but [100, 100]: other
    forward, backward = live.phases
    assert forward.tolist() == [[0, 0], [0, 2000], [40000, 2000], [40004, 2000]]
    assert backward.tolist() == [[0, 2000], [40000, 2000], [40004, 2000]]
    assert live.peak(1.0) == 42004 and live.peak(10.0) == 40004 + 20000


def test_residual_steps_fall_back_to_checkpointing():
    """Their fixed-point inverse is not exact, so `invertible` checkpoints them: same saved
    tensors as `checkpoint` (the gradients are compared in test_gradients_equal_store_mode)."""
    cfg = MODELS["residual_hutchinson"]
    x = data()
    _, saved_checkpoint = step(make_flow(cfg, "checkpoint"), x)
    _, saved_invertible = step(make_flow(cfg, "invertible"), x)
    assert saved_invertible == saved_checkpoint


def test_rerun_restores_the_forward_autocast_state():
    """Under bf16 autocast the re-run must run its subnet in bf16 as the forward did. One
    coupling: its subnet input is reproduced exactly, so the gradients agree to float32 rounding
    (measured 1e-7 relative); re-run in fp32 they would be ~1e-2 off."""
    cfg = ModelConfig(levels=1, steps=1, width=16, conv="none", actnorm="none")
    grads = {}
    for memory in ("store", "invertible"):
        flow = make_flow(cfg, memory, image=(3, 16, 16), dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = flow(data(4, image=(3, 16, 16), dtype=torch.float32))
        out["bpd"].mean().backward()
        grads[memory] = torch.cat([p.grad.flatten() for p in flow.parameters()])
    error = (grads["invertible"] - grads["store"]).abs().max() / grads["store"].abs().max()
    assert error < 1e-5, error.item()


def test_double_backward_through_the_invertible_run_is_refused():
    flow = make_flow(MODELS["glow_affine"], "invertible")
    x = data().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(flow(x)["bpd"].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad_x.sum().backward()


def conv1x1(kind: str):
    return InvConv1x1SVD((4, 2, 2), 2.0) if kind == "svd" else InvConv1x1LU((4, 2, 2))


@pytest.mark.parametrize("kind", ["svd", "lu"])
def test_conv1x1_weights_are_reused_only_within_a_scope(kind):
    """DeepSpeed ZeRO 1/2 updates parameters through views of a flat buffer, which leaves their
    version counters alone (simulated here with .data): only a scope may reuse weights."""
    block = conv1x1(kind)
    with torch.no_grad():
        with reuse_weights():
            w, w_inv = block.weight(), block.inverse_weight()
            assert block.weight() is w and block.inverse_weight() is w_inv  # formed once
            assert torch.allclose(w_inv @ w, torch.eye(4), atol=1e-5)
        assert block.weight() is not block.weight()  # outside a scope: every call forms W
        version = block._sources()[0]._version
        for p in block.parameters():
            p.data.add_(0.1)  # an update the version counters do not see
        assert block._sources()[0]._version == version
        with reuse_weights():
            w_new = block.weight()
    assert not torch.equal(w_new, w)
    assert torch.equal(w_new, block.weight().detach())  # as formed with autograd


def test_normalised_kernel_is_reused_only_while_weights_are_unchanged():
    conv = LipschitzConv2d(3, 5, 3, coeff=0.9).eval()
    with torch.no_grad():
        with reuse_weights():
            kernel = conv.effective_weight()
            assert conv.effective_weight() is kernel
        conv.weight.data.add_(0.1 * torch.randn_like(conv.weight))  # unseen by _version
        with reuse_weights():
            scoped = conv.effective_weight()
        unscoped = conv.effective_weight()  # evaluation: keyed on the kernel's values
    fresh = conv.effective_weight().detach()
    assert not torch.equal(scoped, kernel)
    assert torch.equal(scoped, fresh) and torch.equal(unscoped, fresh)


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_has_a_dimension_for_deepspeed(name):
    """DeepSpeed broadcasts parameters at start-up as byte views, which a 0-d tensor cannot give
    (residual models failed to start: LipSwish's β was 0-d)."""
    flow = build_flow(MODELS[name], IMAGE, N_BITS)
    assert all(p.dim() > 0 for p in flow.parameters())


def train_rows(tmp_path, runs: dict[str, int]) -> dict[str, list[dict]]:
    """Train each memory mode (memory: ZeRO stage) for 3 steps, side by side (one core each);
    {memory: its train rows}."""
    commands = {}
    for memory, zero_stage in runs.items():
        argv = [PYTHON, "-m", "pipeline", "train", "--config", "configs/debug.yaml",
                f"run.root={tmp_path / memory}", f"data.cache={tmp_path}/data",
                f"model.memory={memory}", f"train.zero_stage={zero_stage}", "train.steps=3",
                "tracking.enabled=false", "train.optimum_images=0", "train.samples=4"]  # fmt: skip
        commands[memory] = argv, env_for_subprocess()
    rows = {}
    for memory, out in run_together(commands, timeout=300).items():
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        run = tmp_path / memory / "debug"
        assert f"memory: {memory}" in (run / "config.yaml").read_text()
        lines = (run / "metrics.jsonl").read_text().splitlines()
        rows[memory] = [row for row in map(json.loads, lines) if "train/bpd" in row]
    return rows


def test_training_entry_point_with_invertible_memory_matches_store(tmp_path):
    """The DeepSpeed loop (engine(x), engine.backward(loss)) runs unchanged: the same losses and
    gradient norms at steps 1..3 (float32; measured |Δbpd| ≤ 1e-6). ZeRO 1, whose weight updates
    the parameters' version counters do not see: a stale cached W would show from step 2 (it did:
    Δbpd 1.5e-2)."""
    rows = train_rows(tmp_path, {"store": 0, "invertible": 1})
    store, invertible = rows["store"], rows["invertible"]
    assert [r["step"] for r in invertible] == [r["step"] for r in store] == [1, 2, 3]
    for a, b in zip(store, invertible, strict=True):
        assert abs(a["train/bpd"] - b["train/bpd"]) <= 1e-5, (a["step"], a, b)
        assert abs(a["optim/grad_norm"] - b["optim/grad_norm"]) <= 1e-4 * a["optim/grad_norm"]


def bench(capsys, *args: str) -> dict:
    """`python -m pipeline bench ARGS` in this process (its measurements run in subprocesses)."""
    return json.loads(run_main(capsys, "bench", *args))


TINY_BENCH = ["--levels", "2", "--width", "8", "--batch", "2", "--repeats", "1"]
MODES = {"store", "checkpoint", "invertible"}


# Plumbing and JSON shape, not numbers: one resolution, one depth, the smallest batch search.
@pytest.mark.slow
def test_bench_train_prints_json_for_every_mode_resolution_and_depth(capsys):
    out = bench(capsys, "train", "--resolutions", "16", "--depths", "1", "--depth-resolution", "16",
                *TINY_BENCH)  # fmt: skip
    rows = out["by_resolution"] + out["by_depth"]
    assert len(rows) == 6 and all("error" not in r for r in rows), rows
    for grid in (out["by_resolution"], out["by_depth"]):
        assert {r["mode"] for r in grid} == MODES
    assert [r["model"] for r in out["by_depth"]] == [{"levels": 2, "width": 8, "steps": 1}] * 3
    by_mode = {r["mode"]: r for r in out["by_resolution"]}
    assert by_mode["invertible"]["saved_bytes"] < by_mode["store"]["saved_bytes"]
    assert by_mode["invertible"]["executed_flops"] > by_mode["invertible"]["model_flops"]
    assert all(r["images_per_s"] > 0 and 0 < r["matmul_fraction"] < 1 for r in rows)
    assert out["matmul_flop_s"] > 0 and len(out["machine"]["load_avg_1_5_15"]) == 3

    capped = bench(capsys, "train", "--resolutions", "16", "--modes", "invertible", "--max-batch",
                   "--max-batch-cap", "2", *TINY_BENCH)  # fmt: skip
    (row,) = capped["max_batch"]
    assert row["max_batch"] == 2 and row["capped"] and row["marginal_bytes_per_image"] is not None

    profile = bench(capsys, "train", "--profile", "--resolutions", "16", "--profile-batch", "2",
                    "--profile-steps", "1", "--modes", "store,invertible", *TINY_BENCH)  # fmt: skip
    assert set(profile["profile"]) == {"store", "invertible"}
    assert profile["profile"]["store"]["top_ops_self_cpu"]


@pytest.mark.slow
def test_bench_scaling_prints_json_for_one_and_two_ranks(capsys):
    out = bench(capsys, "scaling", "--steps", "4", "--log-every", "2", "--comm-steps", "2",
                "--rounds", "1")  # fmt: skip
    assert [r["ranks"] for r in out["train"]] == [1, 2] == [r["ranks"] for r in out["comm"]]
    assert all("error" not in r for r in out["train"] + out["comm"]), out
    assert all(r["images_per_s_best"] > 0 for r in out["train"])
    for row in out["comm"]:
        assert 0 <= row["comm_share_instrumented"] < 1 and 0 <= row["comm_share_ablation"] < 1
    assert out["comm_speedup_2_vs_1"] > 0
