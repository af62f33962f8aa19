"""Checkpointing strategies: which blocks, same gradients, fewer saved bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.workers.conftest import TINY_BACKBONES, TINY_CNN_BACKBONES
from workers.backbones import classifier_name, create_backbone
from workers.checkpointing import CHECKPOINTING, apply_checkpointing, find_blocks
from workers.memory import ActivationMeter
from workers.methods import MethodContext, apply_method, check_applicable
from workers.registry import RegistryError


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


def _applicable(methods: list[str]) -> list[tuple[str, str]]:
    """(backbone, method) pairs of the tiny backbones, where the method applies."""
    pairs = []
    for backbone in TINY_BACKBONES + TINY_CNN_BACKBONES:
        for method in methods:
            try:
                check_applicable(method, backbone)
            except RegistryError:
                continue
            pairs.append((backbone, method))
    return pairs


# MobileNet stages (timm's blocks.<i>) hold BatchNorm in training mode: the recompute
# sees the same batch, so the statistics and with them the gradients are the same
@pytest.mark.parametrize(("backbone", "method"), _applicable(["full", "lora", "bitfit"]))
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
