"""Checkpointing strategies: which blocks, same gradients, fewer saved bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.workers.conftest import TINY_BACKBONES, TINY_CNN_BACKBONES, applicable_pairs
from workers.backbones import classifier_name, create_backbone
from workers.checkpointing import CHECKPOINTING, apply_checkpointing, find_blocks
from workers.memory import ActivationMeter
from workers.methods import MethodContext, apply_method


def _model(backbone: str, method: str, strategy: str, args: dict | None = None):  # noqa: ANN202
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=4)
    ctx = MethodContext(classifier=classifier_name(model), total_steps=10)
    model = apply_method(method, {}, model, ctx).model
    chosen = apply_checkpointing(strategy, args, model)
    return model, chosen


def test_registered_strategies() -> None:
    assert {"none", "static"} <= set(CHECKPOINTING.names())


@pytest.mark.parametrize(
    ("backbone", "n_blocks"),
    [("vit_test", 4), ("tiny_vit_test", 5), ("mobilenetv2_test", 5), ("mobilenetv3_test", 6)],
)
def test_blocks_found_in_forward_order(backbone: str, n_blocks: int) -> None:
    names = [n for n, _ in find_blocks(create_backbone(backbone, num_classes=4))]
    assert len(names) == n_blocks
    assert names == sorted(
        names, key=lambda n: [int(t) if t.isdigit() else t for t in n.split(".")]
    )


@pytest.mark.parametrize(("every", "expected"), [(1, 4), (2, 2), (3, 2), (4, 1), (9, 1)])
def test_static_every_k(every: int, expected: int) -> None:
    _, chosen = _model("vit_test", "full", "static", {"every": every})
    assert len(chosen) == expected
    assert chosen[0] == "blocks.0"


def _loss_and_grads(model, x, y):  # noqa: ANN001, ANN202
    model.train()
    meter = ActivationMeter(model)
    with meter:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, meter.peak_bytes


# MobileNet stages (timm's blocks.<i>) hold BatchNorm in training mode: the recompute
# sees the same batch, so the statistics and with them the gradients are the same
@pytest.mark.parametrize(("backbone", "method"), applicable_pairs(["full", "lora", "bitfit"]))
def test_static_checkpointing_is_exact_and_saves_activations(backbone: str, method: str) -> None:
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    plain, _ = _model(backbone, method, "none")
    ckpt, chosen = _model(backbone, method, "static")
    assert chosen
    loss_a, grads_a, saved_a = _loss_and_grads(plain, x, y)
    loss_b, grads_b, saved_b = _loss_and_grads(ckpt, x, y)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4), name
    assert saved_b < 0.6 * saved_a  # recomputing every block keeps only the block inputs


def test_checkpointing_is_off_in_eval() -> None:
    model, _ = _model("vit_test", "full", "static")
    model.eval()
    meter = ActivationMeter(model)
    with torch.no_grad(), meter:
        model(torch.randn(2, 3, 32, 32))
    assert meter.peak_bytes == 0


# ---------------------------------------------------------------- modes and the adaptive plan

from workers import checkpoint_plan  # noqa: E402
from workers.checkpointing import (  # noqa: E402
    MODES,
    Budget,
    Checkpointer,
    block_modes,
    plan_blocks,
    profile_blocks,
    set_mode,
)

ALL_TINY = TINY_BACKBONES + TINY_CNN_BACKBONES


def _drop_path_model(backbone: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(backbone, num_classes=4, drop_path_rate=0.2).train()


def _seeded_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    torch.manual_seed(123)  # the same drop_path draws in every run
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backbone", ALL_TINY)
def test_every_mode_gives_plain_gradients_with_drop_path(backbone: str) -> None:
    """RNG is restored for the recompute: drop_path draws the same paths twice."""
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    model = _drop_path_model(backbone)
    blocks = find_blocks(model)
    reference = _seeded_grads(model, x, y)
    profile = _profiled_model(model)
    allowed = {
        b.name: [o.kind for o in b.options()] for b in profile.blocks
    }  # MobileNetV3's in-place squeeze-excite rules out "selective" there
    assignments = [[mode if mode in allowed[n] else "save" for n, _ in blocks] for mode in MODES]
    assignments.append(
        [allowed[n][i % len(allowed[n])] for i, (n, _) in enumerate(blocks)]
    )  # mixed
    for modes in assignments:
        for (_, block), mode in zip(blocks, modes, strict=True):
            set_mode(block, mode)
        grads = _seeded_grads(model, x, y)
        assert grads.keys() == reference.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], reference[name], atol=1e-5, rtol=1e-4)
    # and drop_path really is on: another seed gives other gradients
    for _, block in blocks:
        set_mode(block, "save")
    torch.manual_seed(7)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    assert any(not torch.allclose(p.grad, reference[n]) for n, p in model.named_parameters())


def _profiled_model(model: torch.nn.Module):  # noqa: ANN202
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    return profile_blocks(model, lambda: F.cross_entropy(model(x), y))


def _profiled(backbone: str, batch: int = 16):  # noqa: ANN202
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=4).train()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 4, (batch,))
    profile = profile_blocks(model, lambda: F.cross_entropy(model(x), y))
    return model, x, y, profile


def _measured_peak(model, x, y, ckpt: Checkpointer) -> int:  # noqa: ANN001
    meter = ActivationMeter(model, find_blocks(model))
    with meter:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    meter.remove()
    return ckpt.activation_peak(meter)


@pytest.mark.parametrize("backbone", ALL_TINY)
def test_profile_predicts_the_measured_activations(backbone: str) -> None:
    model, x, y, profile = _profiled(backbone)
    meter = ActivationMeter(model)
    with meter:
        F.cross_entropy(model(x), y)
    assert profile.unconstrained_bytes == pytest.approx(meter.peak_bytes, rel=0.02)
    for block in profile.blocks:
        assert 0 < block.input_bytes < block.saved_bytes
        if block.selective_bytes is not None:  # the policy recomputes something
            assert block.selective_bytes < block.saved_bytes
        # times are measured (never asserted: a shared machine is noisy), not negative
        assert block.forward_s >= 0.0 and block.cheap_s >= 0.0


@pytest.mark.parametrize("backbone", ALL_TINY)
def test_adaptive_fits_every_budget_and_never_costs_more_than_static(backbone: str) -> None:
    """From the least feasible budget to unconstrained: the measured accounted peak stays
    within the budget, and wherever static fits, adaptive recomputes for no longer."""
    model, x, y, profile = _profiled(backbone)
    costs = profile.costs()
    least = checkpoint_plan.min_peak(costs) + profile.prefix_bytes
    static_modes = [o.kind for c in costs for o in c.options if o.kind in ("recompute",)]
    static_choices = ["recompute"] * len(profile.blocks) + ["save"]  # the head pseudo-block
    assert len(static_modes) == len(profile.blocks)
    static_peak = checkpoint_plan.peak_of(costs, static_choices) + profile.prefix_bytes
    static_time = sum(b.forward_s for b in profile.blocks)
    unconstrained = profile.unconstrained_bytes
    assert least < unconstrained
    times = []
    for fraction in (0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0):
        budget = int(least + fraction * (unconstrained - least))
        ckpt = Checkpointer("adaptive", {}, model)
        ckpt.use(profile, budget - profile.prefix_bytes)
        assert ckpt.predicted_activation_bytes() <= budget
        assert _measured_peak(model, x, y, ckpt) <= budget
        times.append(ckpt.plan.recompute_s)
        if budget >= static_peak:
            assert ckpt.plan.recompute_s <= static_time + 1e-12
    assert times == sorted(times, reverse=True)  # more memory never costs more time
    assert times[-1] == 0.0 and times[0] > 0.0
    model.zero_grad(set_to_none=True)


def test_adaptive_uses_the_selective_mode_where_it_pays() -> None:
    model, x, y, profile = _profiled("vit_test", batch=32)
    middle = (checkpoint_plan.min_peak(profile.costs()) + profile.unconstrained_bytes) // 2
    budget = Budget(middle, profile)
    with_selective = plan_blocks(budget)
    whole_blocks = plan_blocks(budget, selective=False)
    assert with_selective.recompute_s <= whole_blocks.recompute_s
    assert "selective" not in whole_blocks.choices


def test_adaptive_needs_a_budget() -> None:
    torch.manual_seed(0)
    model = create_backbone("vit_test", num_classes=4)
    with pytest.raises(ValueError, match="pass a Budget"):
        apply_checkpointing("adaptive", {}, model)


def test_checkpointer_records_modes_per_block() -> None:
    model, x, y, profile = _profiled("tiny_vit_test")
    ckpt = Checkpointer("adaptive", {}, model)
    ckpt.use(profile, checkpoint_plan.min_peak(profile.costs()))
    modes = block_modes(model)
    assert list(modes) == [n for n, _ in find_blocks(model)]
    assert set(modes.values()) <= set(MODES) and set(modes.values()) != {"save"}
    assert ckpt.checkpointed() == [n for n, m in modes.items() if m != "save"]


@pytest.mark.parametrize("mode", ["selective", "recompute"])
@pytest.mark.parametrize("backbone", ["tiny_vit_test", "mobilenetv2_test"])
def test_recompute_updates_batchnorm_statistics_once(backbone: str, mode: str) -> None:
    """The recompute in backward must not move BatchNorm's running statistics again."""
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    plain, checkpointed = _drop_path_model(backbone), _drop_path_model(backbone)
    for _, block in find_blocks(checkpointed):
        set_mode(block, mode)
    for model in (plain, checkpointed):
        torch.manual_seed(5)
        F.cross_entropy(model(x), y).backward()
    stats = {n: b for n, b in plain.named_buffers() if "running" in n}
    assert stats
    for name, value in checkpointed.named_buffers():
        if name in stats:
            torch.testing.assert_close(value, stats[name], atol=1e-6, rtol=1e-5)
