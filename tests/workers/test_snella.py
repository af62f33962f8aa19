"""SNELLA: identity start, what it trains, kernel rank, sparsity allocation and schedule."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.workers.conftest import TINY_BACKBONES
from workers.backbones import classifier_name, create_backbone
from workers.checkpointing import apply_checkpointing
from workers.methods import METHODS, Adapted, MethodContext, apply_method
from workers.methods.lora import BLOCK_LINEARS
from workers.methods.snella import (
    SnellaAllocator,
    SnellaArgs,
    SnellaLinear,
    allocate,
    distance_kernel,
    keep_schedule,
)
from workers.registry import RegistryError

N_CLASSES = 5


def _adapt(
    backbone: str, args: dict | None = None, total_steps: int = 10
) -> tuple[Adapted, nn.Module]:
    torch.manual_seed(0)
    base = create_backbone(backbone, num_classes=N_CLASSES)
    reference = copy.deepcopy(base)
    ctx = MethodContext(classifier=classifier_name(base), total_steps=total_steps)
    return apply_method("snella", args, base, ctx), reference


def _layers(model: nn.Module) -> dict[str, SnellaLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SnellaLinear)}


def _allocator(adapted: Adapted) -> SnellaAllocator:
    return adapted.on_optimizer_step.__self__


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(
        0, N_CLASSES, (n,), generator=gen
    )


def _set_scales(model: nn.Module, value: float) -> None:
    """A nonzero scale, as after some training: the factors then receive gradients."""
    with torch.no_grad():
        for layer in _layers(model).values():
            layer.snella_scale.fill_(value)


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_starts_as_the_base_model(backbone: str) -> None:
    adapted, reference = _adapt(backbone, {"r": 4})
    x, _ = _batch(3)
    reference.eval()
    with torch.no_grad():
        expected = reference(x)
    adapted.model.eval()
    with torch.no_grad():
        assert torch.allclose(adapted.model(x), expected, atol=1e-6)
    # the training path (checkpointed merge) computes the same
    assert torch.allclose(adapted.model(x), expected, atol=1e-6)
    # the base layers' parameter names are unchanged: base state dicts still load
    assert set(reference.state_dict()) <= set(adapted.model.state_dict())


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
@pytest.mark.parametrize(("kernel", "scalars"), [("mixed", 4), ("distance", 1)])
def test_trains_factors_and_head_only(backbone: str, kernel: str, scalars: int) -> None:
    r = 4
    adapted, reference = _adapt(backbone, {"r": r, "kernel": kernel})
    model, head = adapted.model, classifier_name(reference)
    targets = [
        m
        for n, m in reference.named_modules()
        if isinstance(m, nn.Linear) and re.fullmatch(BLOCK_LINEARS, n)
    ]
    assert len(targets) == len(_layers(model)) == 16
    head_numel = sum(p.numel() for n, p in reference.named_parameters() if n.startswith(head + "."))
    # per layer: A (in x r) + B (out x r) + scale (+ alpha, gamma, beta for "mixed")
    closed_form = sum(r * (m.in_features + m.out_features) + scalars for m in targets) + head_numel
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == closed_form
    assert all(".snella_" in n or n.startswith(head + ".") for n in trainable)
    assert not any("patch_embed" in n for n in trainable)

    _set_scales(model, 0.5)
    x, y = _batch(4)
    F.cross_entropy(model(x), y).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)
    factors = [p for n, p in trainable.items() if n.endswith(("snella_A", "snella_B"))]
    assert all(p.grad.abs().sum() > 0 for p in factors)


def test_adapter_alone_lowers_the_loss() -> None:
    adapted, _ = _adapt("vit_test", {"r": 4}, total_steps=8)
    model = adapted.model
    for name, param in model.named_parameters():  # head frozen: only the adapter learns
        if name.startswith("head."):
            param.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = _batch()
    model.train()
    losses = []
    for step in range(1, 9):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        adapted.on_optimizer_step(step)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02


@pytest.mark.parametrize("r", [2, 4, 8])
def test_kernel_merges_to_a_matrix_of_rank_above_r(r: int) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, r, generator=gen), torch.randn(96, r, generator=gen)
    assert torch.linalg.matrix_rank(b @ a.T) == r  # LoRA's linear kernel: rank r at most
    assert torch.linalg.matrix_rank(distance_kernel(b, a)) == 64  # full rank
    layer = SnellaLinear(nn.Linear(64, 96), r, "mixed", keep=64 * 96)
    with torch.no_grad():
        layer.snella_A.copy_(a), layer.snella_B.copy_(b)
        assert torch.linalg.matrix_rank(layer.kernel_matrix()) > r


# ---------------------------------------------------------------- allocation


def test_schedule_warmup_cubic_decrease_and_final_phase() -> None:
    config = SnellaArgs(initial_keep=0.9, final_keep=0.3, warmup_fraction=0.1, final_fraction=0.2)
    at = [keep_schedule(s, 100, config) for s in range(101)]
    assert at[0] == at[10] == 0.9  # warm-up: steps 0..10
    assert at[45] == pytest.approx(0.3 + 0.6 * (1 - 35 / 70) ** 3)  # cubic over steps 10..80
    assert at[80] == at[100] == 0.3  # final phase
    assert all(later <= earlier for earlier, later in zip(at, at[1:], strict=False))
    assert keep_schedule(500, 100, config) == 0.3


def test_allocate_caps_layers_and_meets_the_budget() -> None:
    assert allocate([3.0, 1.0], [10, 100], 40) == [10, 30]  # excess of a full layer moves on
    assert allocate([0.0, 0.0], [100, 300], 200) == [50, 150]  # no scores: one keep ratio
    assert allocate([1.0, 0.0], [10, 10], 15) == [10, 5]  # unscored layers take the rest
    counts = allocate([0.3, 0.2, 0.5], [7, 11, 13], 17)
    assert sum(counts) == 17 and all(c <= s for c, s in zip(counts, [7, 11, 13], strict=True))
    assert allocate([1.0], [10], 50) == [10]


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_measured_sparsity_follows_the_allocation_and_the_budget(backbone: str) -> None:
    total = 6
    args = {"r": 4, "initial_keep": 0.9, "final_keep": 0.3}
    adapted, _ = _adapt(backbone, args, total_steps=total)
    model, allocator = adapted.model, _allocator(adapted)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = _batch()
    for step in range(1, 4):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        adapted.on_optimizer_step(step)
    layers = _layers(model)
    with torch.no_grad():
        nonzero = {n: int((layer.delta_weight() != 0).sum()) for n, layer in layers.items()}
    for name, layer in layers.items():
        assert abs(nonzero[name] - layer.keep) <= 1, name
        assert layer.keep == pytest.approx(allocator.allocation()[name] * layer.weight.numel())
    entries = sum(layer.weight.numel() for layer in layers.values())
    budget = keep_schedule(3, total, SnellaArgs(**args))  # 0.3 + 0.6 / 8
    assert budget == pytest.approx(0.375)
    assert abs(sum(nonzero.values()) - budget * entries) <= len(layers)
    # layers compete: after importance is measured, keep ratios differ between layers
    assert len({round(layer.keep_ratio, 3) for layer in layers.values()}) > 1


def test_a_more_important_layer_gets_a_larger_allocation() -> None:
    args = {"r": 4, "initial_keep": 0.5, "final_keep": 0.1}
    adapted, _ = _adapt("vit_test", args, total_steps=10)
    model = adapted.model
    _set_scales(model, 0.5)
    x, y = _batch(4)
    F.cross_entropy(model(x), y).backward()
    layers = _layers(model)
    boosted = "blocks.2.mlp.fc1"
    for name, layer in layers.items():  # even sensitivities, then one layer 10x more sensitive
        for param in (layer.snella_A, layer.snella_B):
            param.grad = torch.full_like(param, 1e-3) / param.detach().abs().clamp_min(1e-6)
            if name == boosted:
                param.grad *= 10
    adapted.on_optimizer_step(4)
    ratios = _allocator(adapted).allocation()
    assert ratios[boosted] > max(r for n, r in ratios.items() if n != boosted)
    same_shape = [n for n in ratios if n.endswith("mlp.fc1") and n != boosted]
    assert all(ratios[boosted] > 2 * ratios[n] for n in same_shape)


# ---------------------------------------------------------------- memory and composition


def test_optimizer_state_holds_factors_and_head_only() -> None:
    adapted, reference = _adapt("vit_test", {"r": 4})
    model = adapted.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    _set_scales(model, 0.5)
    x, y = _batch(4)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    allowed = {tuple(p.shape) for p in trainable}
    frozen = {tuple(p.shape) for n, p in reference.named_parameters() if not n.startswith("head.")}
    assert not allowed & frozen  # rank 4: no factor has a frozen weight's shape
    moments = [t for state in optimizer.state.values() for k, t in state.items() if k != "step"]
    assert moments and all(tuple(t.shape) in allowed for t in moments)
    assert sum(t.numel() for t in moments) == 2 * sum(p.numel() for p in trainable)
    assert not any(
        p.requires_grad
        for n, p in model.named_parameters()
        if n.endswith(".weight") and "head" not in n
    )


def test_composes_with_gradient_checkpointing() -> None:
    adapted, _ = _adapt("vit_test", {"r": 4, "initial_keep": 0.5, "final_keep": 0.5})
    plain = adapted.model
    _set_scales(plain, 0.5)
    checkpointed = copy.deepcopy(plain)
    chosen = apply_checkpointing("static", {}, checkpointed)
    assert chosen == [f"blocks.{i}" for i in range(4)]
    x, y = _batch(4)
    losses = []
    for model in (plain, checkpointed):
        model.train()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    grads = dict(checkpointed.named_parameters())
    for name, param in plain.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, grads[name].grad, atol=1e-6), name


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ({"r": 0}, "r must be >= 1"),
        ({"r": 3}, "r must be even"),
        ({"kernel": "rbf"}, "kernel must be one of"),
        ({"initial_keep": 0.0}, "initial_keep must be in"),
        ({"final_keep": 1.5}, "final_keep must be in"),
        ({"initial_keep": 0.3, "final_keep": 0.5}, "must not exceed initial_keep"),
        ({"warmup_fraction": 0.6, "final_fraction": 0.4}, "warmup_fraction \\+ final_fraction"),
        ({"beta1": 1.0}, "beta1 must be in"),
        ({"target": "blocks.(["}, "not a valid regular expression"),
        ({"rank": 4}, "unknown argument"),
    ],
)
def test_bad_arguments_are_rejected(args: dict, fragment: str) -> None:
    with pytest.raises(RegistryError, match=fragment):
        METHODS.resolve_args("snella", args)


def test_defaults_resolve_and_linear_kernel_takes_odd_rank() -> None:
    resolved = METHODS.resolve_args("snella", {})
    assert resolved["r"] == 32 and resolved["kernel"] == "mixed"
    assert METHODS.resolve_args("snella", {"kernel": "linear", "r": 3})["r"] == 3
