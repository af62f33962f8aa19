"""The ``pointwise`` and ``matmul`` modes: outputs recomputed from their nodes' inputs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from workers import checkpoint_plan
from workers.backbones import create_backbone
from workers.checkpointing import Budget, find_blocks, plan_blocks, profile_blocks, set_mode
from workers.memory import ActivationMeter
from workers.pointwise_recompute import MATMUL, RECOMPUTE, RecomputePointwise


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("vit_test", num_classes=4).train()


def _grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, int]:
    model.zero_grad(set_to_none=True)
    meter = ActivationMeter(model)
    with meter:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, meter.last_bytes


def test_vit_blocks_drop_exactly_their_norm_and_gelu_outputs() -> None:
    """Per ViT block: two norm outputs (width C) and GELU's (4C) are not kept, and the
    gradients are those of plain autograd, bit for bit."""
    model = _vit()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    reference, saved = _grads(model, x, y)
    for _, block in find_blocks(model):
        set_mode(block, "pointwise")
    grads, kept = _grads(model, x, y)
    tokens, width, blocks = 4 * 4 + 1, 64, 4  # 32 px / patch 8, class token; dim 64; depth 4
    assert saved - kept == blocks * 6 * 8 * tokens * width * 4  # fp32
    for name, grad in reference.items():
        assert torch.equal(grads[name], grad), name


def test_profile_offers_pointwise_and_the_meter_sees_what_it_keeps() -> None:
    model = _vit()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    profile = profile_blocks(model, lambda: F.cross_entropy(model(x), y), timed=False)
    name, block = find_blocks(model)[1]
    (costs,) = [b for b in profile.blocks if b.name == name]
    assert "pointwise" in [o.kind for o in costs.options()]
    assert costs.pointwise_bytes < costs.saved_bytes
    # in a model run (input from the previous block), the outer meter counts what is kept
    captured = {}
    hook = block.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach()))
    model(x)
    hook.remove()
    inner = captured["x"].requires_grad_()
    meter = ActivationMeter(block)
    with meter, RecomputePointwise(inner):
        block._vramsweep_plain_forward(inner)
    assert meter.last_bytes == costs.pointwise_bytes


def test_tensors_made_before_the_region_are_kept() -> None:
    """An activation output made outside the region (another block's) is not rebuilt."""

    def run(region: bool) -> tuple[torch.Tensor, int]:
        torch.manual_seed(0)
        z = torch.randn(64, 32, requires_grad=True)
        w = torch.randn(16, 32, requires_grad=True)
        outside = F.gelu(z)
        meter = ActivationMeter(torch.nn.Linear(1, 1))
        with meter, RecomputePointwise(outside) if region else contextlib.nullcontext():
            inside = F.gelu(outside * 2.0)
            out = F.linear(outside, w).sum() + F.linear(inside, w).square().sum()
        out.backward()
        return w.grad, meter.last_bytes

    plain_grad, plain_bytes = run(region=False)
    grad, kept = run(region=True)
    # rebuilt: only the inner GELU's output (saved by the second linear)
    assert plain_bytes - kept == 64 * 32 * 4
    torch.testing.assert_close(grad, plain_grad)


@pytest.mark.parametrize("backbone", ["tiny_vit_test", "mobilenetv3_test"])
def test_pointwise_blocks_give_plain_gradients_with_fewer_bytes(backbone: str) -> None:
    """Hierarchical ViT and MobileNetV3 (BatchNorm, hardswish, in-place ops): where the
    profile offers the mode, it keeps less and changes no gradient."""
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=4).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    profile = profile_blocks(model, lambda: F.cross_entropy(model(x), y), timed=False)
    offered = {b.name for b in profile.blocks if "pointwise" in [o.kind for o in b.options()]}
    assert offered
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference, saved = _grads(model, x, y)
    model.load_state_dict(state)  # the same BatchNorm statistics for the second run
    for name, block in find_blocks(model):
        set_mode(block, "pointwise" if name in offered else "save")
    grads, kept = _grads(model, x, y)
    assert kept < saved
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the matmul mode


def _counting(monkeypatch: pytest.MonkeyPatch, table: dict, counts: dict) -> None:
    for name, rebuild in list(table.items()):

        def counted(node: object, name: str = name, rebuild: Callable = rebuild) -> torch.Tensor:
            counts[name] = counts.get(name, 0) + 1
            return rebuild(node)

        monkeypatch.setitem(table, name, counted)


def test_matmul_mode_rebuilds_linear_and_attention_outputs_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Per ViT block, besides the pointwise outputs: query/key/value (3C), attention's
    output (C) and the MLP's hidden activation (4C) are not kept; each output is rebuilt
    once per backward (one matmul for query, key and value; GELU's input, read to rebuild
    GELU's output, held for GELU's own backward), and the gradients are plain autograd's,
    bit for bit."""
    model = _vit()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    reference, saved = _grads(model, x, y)
    for _, block in find_blocks(model):
        set_mode(block, "matmul")
    counts: dict[str, int] = {}
    _counting(monkeypatch, RECOMPUTE, counts)
    _counting(monkeypatch, MATMUL, counts)
    grads, kept = _grads(model, x, y)
    tokens, width, blocks = 4 * 4 + 1, 64, 4
    assert saved - kept == blocks * 14 * 8 * tokens * width * 4  # 6 pointwise + 8 widths
    for name, grad in reference.items():
        assert torch.equal(grads[name], grad), name
    assert counts == {
        "NativeLayerNormBackward0": 2 * blocks,
        "GeluBackward0": blocks,
        "UnsafeViewBackward0": 2 * blocks,  # the token-batched linear layers: qkv, fc1
        "AddmmBackward0": 2 * blocks,
        "ScaledDotProductFlashAttentionForCpuBackward0": blocks,
    }


def test_matmul_mode_keeps_a_frozen_linear_layers_output() -> None:
    """A linear layer whose weight is frozen keeps no input to rebuild from: its output
    is kept (the MLP's hidden activation, 4C per block), the rest is still rebuilt."""

    def matmul_grads(model: torch.nn.Module) -> tuple[dict, int]:
        for _, block in find_blocks(model):
            set_mode(block, "matmul")
        return _grads(model, x, y)

    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    _, all_rebuilt = matmul_grads(_vit())
    model = _vit()
    for _, block in find_blocks(model):
        block.mlp.fc1.weight.requires_grad_(False)
    reference, _ = _grads(model, x, y)
    grads, kept = matmul_grads(model)
    tokens, width, blocks = 4 * 4 + 1, 64, 4
    assert kept - all_rebuilt == blocks * 4 * 8 * tokens * width * 4
    for name, grad in reference.items():
        assert torch.equal(grads[name], grad), name


def test_profile_offers_matmul_below_pointwise_and_whole_blocks_only_without_it() -> None:
    model = _vit()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    profile = profile_blocks(model, lambda: F.cross_entropy(model(x), y), timed=False)
    for costs in profile.blocks:
        kinds = {o.kind: o for o in costs.options()}
        assert kinds["matmul"].kept_bytes < kinds["pointwise"].kept_bytes
        assert kinds["matmul"].peak_bytes == kinds["save"].peak_bytes
    budget = Budget(checkpoint_plan.min_peak(profile.costs()), profile)
    assert "matmul" not in plan_blocks(budget, selective=False).choices
