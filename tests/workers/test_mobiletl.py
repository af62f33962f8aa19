"""MobileTL: which parameters train, the 1-bit activation backward, frozen inner norms, memory."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.workers.conftest import TINY_CNN_BACKBONES
from workers.backbones import classifier_name, create_backbone
from workers.checkpointing import apply_checkpointing
from workers.memory import ActivationMeter
from workers.methods import METHODS, MethodContext, apply_method
from workers.methods.mobiletl import (
    FrozenStatsNormAct,
    StepGradActivation,
    pack_bits,
    unpack_bits,
)
from workers.registry import RegistryError

# ---------------------------------------------------------------- helpers, from the architecture


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"blocks.{s}.{i}", u) for s, st in enumerate(model.blocks) for i, u in enumerate(st)]


def _is_irb(unit: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in unit.modules())


def _split(model: nn.Module, k: int) -> tuple[list[str], list[str], list[str]]:
    """Names of (frozen units, tuned blocks, trained-as-usual units) for top-k."""
    units = _units(model)
    irbs = [i for i, (_, u) in enumerate(units) if _is_irb(u)]
    first = irbs[-k]
    frozen = [n for n, _ in units[:first]]
    tuned = [units[i][0] for i in irbs[-k:]]
    usual = [n for n, _ in units[first:] if n not in tuned]
    return frozen, tuned, usual


def _above(model: nn.Module) -> list[str]:
    children = [n for n, _ in model.named_children()]
    return children[children.index("blocks") + 1 :]


def _layer_params(m: nn.Module) -> int:
    """Parameters of one layer from its shape attributes."""
    if isinstance(m, nn.Conv2d):
        fan_in = m.in_channels // m.groups * math.prod(m.kernel_size)
        return m.out_channels * fan_in + (m.out_channels if m.bias is not None else 0)
    if isinstance(m, nn.BatchNorm2d):
        return 2 * m.num_features
    if isinstance(m, nn.Linear):
        return m.out_features * m.in_features + (m.out_features if m.bias is not None else 0)
    return 0


def closed_form(ref: nn.Module, k: int, vanilla: bool = False) -> int:
    """sum over tuned blocks of convs + inner shifts (+ scales if vanilla) + 2 C_out, + P_above."""
    _, tuned, usual = _split(ref, k)
    total = 0
    for name in tuned:
        block = ref.get_submodule(name)
        norms = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
        total += sum(_layer_params(c) for c in block.modules() if isinstance(c, nn.Conv2d))
        total += sum(n.num_features for n in norms[:-1]) * (2 if vanilla else 1)
        total += 2 * norms[-1].num_features
    for name in usual + _above(ref):
        total += sum(_layer_params(m) for m in ref.get_submodule(name).modules())
    return total


# top_k=1 by hand. V2: last block 32 -> 192 -> 48, 3x3: 192*32 + 9*192 + 48*192 + 2*192 +
# 2*48 = 17568; above: conv_head 48*128 + bn2 2*128 + classifier 128*4 + 4 = 6916.
# V3: last block 40 -> 240 -> 40, 3x3, SE 64: 240*40 + 9*240 + 40*240 + 2*240 + 2*40 +
# (240*64 + 64 + 64*240 + 240) = 52944; above: ConvBnAct 40*96 + 2*96, conv_head
# 96*128 + 128, classifier 128*4 + 4 = 16964.
BY_HAND = {"mobilenetv2_test": 17_568 + 6_916, "mobilenetv3_test": 52_944 + 16_964}


def _reference(backbone: str) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone(backbone, num_classes=4)


def _adapted(backbone: str, **args: object) -> nn.Module:
    model = _reference(backbone)
    ctx = MethodContext(classifier=classifier_name(model), total_steps=10)
    return apply_method("mobiletl", args, model, ctx).model


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- which parameters train


@pytest.mark.parametrize("backbone", TINY_CNN_BACKBONES)
def test_only_intended_parameters_train_and_get_gradients(backbone: str) -> None:
    ref, model = _reference(backbone), _adapted(backbone, top_k=3)
    frozen, tuned, usual = _split(ref, 3)
    expected = set()
    for name in tuned:
        block = ref.get_submodule(name)
        norms = [n for n, m in block.named_modules() if isinstance(m, nn.BatchNorm2d)]
        for n, m in block.named_modules():
            if isinstance(m, nn.Conv2d):
                expected |= {f"{name}.{n}.{p}" for p, _ in m.named_parameters()}
        expected |= {f"{name}.{n}.bias" for n in norms[:-1]}  # shifts only
        expected |= {f"{name}.{norms[-1]}.weight", f"{name}.{norms[-1]}.bias"}  # output norm
    for name in usual + _above(ref):
        expected |= {f"{name}.{p}" for p, _ in ref.get_submodule(name).named_parameters()}
    assert _trainable(model) == expected
    assert not any(n.startswith(tuple(f + "." for f in frozen)) for n in expected)

    x, y = _batch()
    F.cross_entropy(model.train()(x), y).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in with_grad)


@pytest.mark.parametrize("backbone", TINY_CNN_BACKBONES)
@pytest.mark.parametrize("top_k", [1, 3, 5, 8])
def test_trainable_count_is_the_closed_form(backbone: str, top_k: int) -> None:
    model = _adapted(backbone, top_k=top_k)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == closed_form(_reference(backbone), top_k)
    if top_k == 1:
        assert count == BY_HAND[backbone]
    # parameters stay parameters (frozen ones included): the model's size is unchanged
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in _reference(backbone).parameters()
    )


@pytest.mark.parametrize("backbone", TINY_CNN_BACKBONES)
def test_vanilla_baseline_also_trains_the_inner_scales(backbone: str) -> None:
    model = _adapted(backbone, top_k=2, vanilla=True)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == closed_form(_reference(backbone), 2, vanilla=True)
    assert not any(isinstance(m, StepGradActivation | FrozenStatsNormAct) for m in model.blocks[-1])


# ---------------------------------------------------------------- behaviour


@pytest.mark.parametrize("backbone", TINY_CNN_BACKBONES)
def test_conversion_keeps_the_function_in_eval(backbone: str) -> None:
    ref, model = _reference(backbone).eval(), _adapted(backbone).eval()
    x, _ = _batch()
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


@pytest.mark.parametrize("backbone", TINY_CNN_BACKBONES)
def test_training_steps_lower_the_loss(backbone: str) -> None:
    model = _adapted(backbone, top_k=3).train()
    x, y = _batch(16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def _modules(model: nn.Module, names: list[str], kind: type) -> list[nn.Module]:
    return [m for n in names for m in model.get_submodule(n).modules() if isinstance(m, kind)]


@pytest.mark.parametrize("backbone", TINY_CNN_BACKBONES)
def test_inner_norms_keep_frozen_statistics_after_train(backbone: str) -> None:
    ref, model = _reference(backbone), _adapted(backbone, top_k=3)
    frozen, tuned, _ = _split(ref, 3)
    inner = _modules(model, tuned, FrozenStatsNormAct)
    fixed = inner + _modules(model, ["bn1", *frozen], FrozenStatsNormAct)  # + the trunk's
    outputs = [
        [m for m in model.get_submodule(n).modules() if isinstance(m, nn.BatchNorm2d)][-1]
        for n in tuned
    ]
    # every norm of a tuned block but its last one, every norm below
    assert len(inner) == len(_modules(ref, tuned, nn.BatchNorm2d)) - len(tuned)
    assert len(fixed) - len(inner) == len(_modules(ref, ["bn1", *frozen], nn.BatchNorm2d))
    assert not _modules(model, ["bn1", *frozen], nn.BatchNorm2d)
    before = {id(m): m.running_mean.clone() for m in fixed + outputs}

    model.train()
    x, _ = _batch()
    model(x)
    for m in fixed:
        assert torch.equal(m.running_mean, before[id(m)])  # statistics never move
        assert not m.weight.requires_grad  # nor does the scale
        h = torch.randn(2, m.num_features, 3, 3)
        with torch.no_grad():
            stats = F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, eps=m.eps)
            assert torch.allclose(m(h), m.act(stats), atol=1e-5)  # inference BN in train mode
    # the paper updates the output norm's statistics: batch statistics in training
    assert all(m.training and not torch.equal(m.running_mean, before[id(m)]) for m in outputs)


@pytest.mark.parametrize("backbone", TINY_CNN_BACKBONES)
def test_frozen_blocks_build_no_graph(backbone: str) -> None:
    model = _adapted(backbone, top_k=2).train()
    frozen, _, _ = _split(model, 2)
    outputs = []
    model.get_submodule(frozen[-1]).register_forward_hook(lambda m, a, out: outputs.append(out))
    x, _ = _batch()
    assert model(x).requires_grad
    assert outputs and outputs[0].grad_fn is None and not outputs[0].requires_grad


@pytest.mark.parametrize("backbone", TINY_CNN_BACKBONES)
def test_static_checkpointing_keeps_the_gradients(backbone: str) -> None:
    x, y = _batch()
    grads = []
    for strategy in ("none", "static"):
        model = _adapted(backbone, top_k=3)
        apply_checkpointing(strategy, None, model)
        F.cross_entropy(model.train()(x), y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-5, rtol=1e-4), name


# ---------------------------------------------------------------- the 1-bit activation backward

X = torch.tensor([-4.0, -3.0, -1.5, -0.5, 0.0, 0.5, 1.5, 3.0, 5.0, 6.0, 7.0, -7.0, 2.0])
STEP = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1], dtype=torch.bool)  # 1[x > 0]
INSIDE = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1], dtype=torch.bool)  # 0 < x < 6
# bits 00000111 11101 + three bits of padding: 0b00000111, 0b11101000
PACKED_STEP = [7, 232]
PACKED_INSIDE = [7, 136]  # 00000111 10001000


@pytest.mark.parametrize(
    ("act", "relu6_mask", "forward", "mask", "packed"),
    [
        (nn.ReLU6(), "exact", F.relu6, INSIDE, PACKED_INSIDE),
        (nn.ReLU6(), "signed", F.relu6, STEP, PACKED_STEP),
        (nn.Hardswish(), "exact", F.hardswish, STEP, PACKED_STEP),
        (nn.ReLU(inplace=True), "exact", F.relu, STEP, PACKED_STEP),
    ],
)
def test_activation_backward_is_a_packed_mask(
    act: nn.Module,
    relu6_mask: str,
    forward: Callable[[torch.Tensor], torch.Tensor],
    mask: torch.Tensor,
    packed: list[int],
) -> None:
    x = X.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = StepGradActivation(act, relu6_mask)(x)
    assert torch.equal(y, forward(X))  # the forward is exact
    assert torch.equal(x, X)  # and never in place
    assert len(saved) == 1 and saved[0].dtype == torch.uint8
    assert saved[0].tolist() == packed  # ceil(13 / 8) = 2 bytes
    grad = torch.arange(1.0, 14.0)
    y.backward(grad)
    assert torch.equal(x.grad, torch.where(mask, grad, 0.0))


@pytest.mark.parametrize(("act", "forward", "exact"), [
    (nn.ReLU6(), F.relu6, True), (nn.ReLU(), F.relu, True), (nn.Hardswish(), F.hardswish, False)
])  # fmt: skip
def test_relu_and_relu6_masks_are_their_exact_derivatives(
    act: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], exact: bool
) -> None:
    x = torch.cat([X, torch.randn(200, generator=torch.Generator().manual_seed(0)) * 4])
    grad = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    ours = x.clone().requires_grad_(True)
    StepGradActivation(act)(ours).backward(grad)
    autograd = x.clone().requires_grad_(True)
    forward(autograd).backward(grad)
    # hard-swish: the step at 0 in place of its ramp (2x + 3) / 6 on [-3, 3]
    assert torch.equal(ours.grad, autograd.grad) == exact


@pytest.mark.parametrize("shape", [(13,), (2, 3, 5, 7), (4, 8, 2, 2)])
def test_pack_bits_is_numpys_packbits(shape: tuple[int, ...]) -> None:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(mask.numel() / 8)
    assert packed.tolist() == np.packbits(mask.numpy().reshape(-1)).tolist()
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_no_mask_is_kept_without_grad() -> None:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = StepGradActivation(nn.ReLU6())(X)
    assert torch.equal(y, F.relu6(X)) and not saved


# ---------------------------------------------------------------- memory


def _saved_bytes(backbone: str, vanilla: bool, top_k: int = 5) -> tuple[int, int]:
    """Bytes saved for backward by (the tuned blocks alone, the whole forward)."""
    model = _adapted(backbone, top_k=top_k, vanilla=vanilla).train()
    _, tuned, _ = _split(model, top_k)
    blocks = [model.get_submodule(n) for n in tuned]
    inputs = []
    blocks[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    x, _ = _batch(16)
    whole = ActivationMeter(model)
    with whole:
        model(x)
    only_blocks = ActivationMeter(model)
    with only_blocks:
        h = inputs[0]
        for block in blocks:
            h = block(h)
    return only_blocks.peak_bytes, whole.peak_bytes


@pytest.mark.parametrize("backbone", TINY_CNN_BACKBONES)
def test_tuned_blocks_save_less_than_ordinary_fine_tuning_of_them(backbone: str) -> None:
    """Measured with the same frozen trunk and head: V2 saves 0.38x, V3 0.51x (top 5)."""
    blocks, whole = _saved_bytes(backbone, vanilla=False)
    blocks_ref, whole_ref = _saved_bytes(backbone, vanilla=True)
    assert 0.25 < blocks / blocks_ref < 0.6
    assert whole < 0.6 * whole_ref


# ---------------------------------------------------------------- arguments


def test_defaults_and_bad_arguments() -> None:
    assert METHODS.resolve_args("mobiletl", {}) == {
        "top_k": 5,
        "vanilla": False,
        "relu6_mask": "exact",
    }
    for args, fragment in [
        ({"relu6_mask": "step"}, "relu6_mask must be one of exact, signed, got 'step'"),
        ({"top_k": 0}, "top_k must be >= 1, got 0"),
        ({"top_k": 2.5}, "must be int"),
        ({"vanilla": "no"}, "must be bool"),
        ({"k": 3}, "unknown argument"),
    ]:
        with pytest.raises(RegistryError, match=fragment):
            METHODS.resolve_args("mobiletl", args)


@pytest.mark.parametrize("backbone", TINY_CNN_BACKBONES)
def test_top_k_beyond_the_blocks_is_a_clear_error(backbone: str) -> None:
    with pytest.raises(RegistryError, match="top_k=9 exceeds the 8 inverted residual blocks"):
        _adapted(backbone, top_k=9)


def test_a_model_without_mobilenet_stages_is_refused() -> None:
    model = create_backbone("vit_test", num_classes=4)
    ctx = MethodContext(classifier=classifier_name(model), total_steps=10)
    with pytest.raises(RegistryError, match="needs a timm MobileNet-style model"):
        apply_method("mobiletl", {}, model, ctx)
