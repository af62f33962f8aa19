"""Any timm model as a backbone: validation on the meta device, the chain of blocks found
from its structure, checkpointing with plain gradients, a trial that runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orchestrator.spec import TrainConfig, TrialSpec
from workers import checkpoint_plan
from workers.backbones import BACKBONES, check_backbone, create_backbone
from workers.checkpointing import Checkpointer, apply_checkpointing, find_blocks, profile_blocks
from workers.memory import ActivationMeter
from workers.registry import RegistryError
from workers.trial import run_trial

# Small widths of three kinds of timm architecture (each builds in well under a second).
SMALL = {
    # a CNN: ResNet basic blocks, one per stage
    "resnet": (
        "resnet18",
        {
            "img_size": 32,
            "drop_path_rate": 0.2,
            "model_args": {"layers": [1, 1, 1, 1], "stem_width": 8, "channels": [8, 16, 24, 32]},
        },
    ),
    # a hierarchical transformer: Swin stages of windowed-attention blocks
    "swin": (
        "swin_tiny_patch4_window7_224",
        {
            "img_size": 32,
            "drop_path_rate": 0.2,
            "model_args": {
                "patch_size": 2,
                "window_size": 4,
                "embed_dim": 16,
                "depths": [2, 2, 2, 2],
                "num_heads": [1, 1, 2, 2],
            },
        },
    ),
    # a hybrid: MobileViT's inverted-residual stages and conv + transformer blocks
    "mobilevit": ("mobilevit_xxs", {"img_size": 64}),
    # dense blocks (a ModuleDict whose layers each take the list of earlier outputs)
    "densenet": (
        "densenet121",
        {"img_size": 32, "model_args": {"growth_rate": 4, "block_config": [2, 2]}},
    ),
}
EXPECTED_BLOCKS = {
    "resnet": ["layer1.0", "layer2.0", "layer3.0", "layer4.0"],
    "swin": [f"layers.{s}.blocks.{b}" for s in range(4) for b in range(2)],
    "densenet": [
        f"features.{n}" for n in ("norm0", "denseblock1", "transition1", "denseblock2", "norm5")
    ],
}


def _model(kind: str) -> torch.nn.Module:
    name, args = SMALL[kind]
    torch.manual_seed(0)
    return create_backbone(name, num_classes=4, **args).train()


def _batch(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.pretrained_cfg["input_size"][-1]
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, size, size, generator=generator), torch.tensor([0, 1, 2, 3, 0, 1])


def _grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    torch.manual_seed(123)  # the same drop_path draws in every run
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_timm_names_resolve_without_registration() -> None:
    assert "resnet18" in BACKBONES and not BACKBONES.is_registered("resnet18")
    assert "resnet18x" not in BACKBONES
    # model_args joined after records existed: a registered backbone's id stays the same
    assert BACKBONES.resolve_args("vit_test", {}) == {
        "pretrained": None,
        "img_size": 0,
        "drop_path_rate": 0.0,
    }
    resolved = BACKBONES.resolve_args("resnet18", {"model_args": {"layers": [1, 1, 1, 1]}})
    assert resolved["model_args"] == {"layers": [1, 1, 1, 1]}


@pytest.mark.parametrize("kind", sorted(EXPECTED_BLOCKS))
def test_the_chain_of_blocks_is_found_from_the_structure(kind: str) -> None:
    assert [n for n, _ in find_blocks(_model(kind))] == EXPECTED_BLOCKS[kind]


def test_structure_is_read_on_the_meta_device() -> None:
    """Validation builds on the meta device: what the real model has, without memory."""
    name, args = SMALL["swin"]
    structure = check_backbone(name, args)
    real = create_backbone(name, num_classes=4, **args)
    assert list(structure.blocks) == [n for n, _ in find_blocks(real)]
    linears = [n for n, m in real.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(structure.linears) == {n for n in linears if ".blocks." in n}
    assert structure.attention == structure.blocks and not structure.mamba


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_static_and_adaptive_give_plain_gradients(kind: str) -> None:
    """none vs static vs adaptive at a tight budget: the same gradients (drop_path on)."""
    model = _model(kind)
    x, y = _batch(model)
    reference = _grads(model, x, y)

    apply_checkpointing("static", {}, model)
    static = _grads(model, x, y)
    apply_checkpointing("none", {}, model)

    profile = profile_blocks(model, lambda: F.cross_entropy(model(x), y))
    least = checkpoint_plan.min_peak(profile.costs())
    unconstrained = profile.unconstrained_bytes - profile.prefix_bytes
    assert least < unconstrained
    checkpointer = Checkpointer("adaptive", {}, model)
    budget = least + (unconstrained - least) // 4
    checkpointer.use(profile, budget)
    assert checkpointer.checkpointed(), "a tight budget must recompute some block"
    meter = ActivationMeter(model, find_blocks(model))
    with meter:
        torch.manual_seed(123)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    meter.remove()
    assert checkpointer.activation_peak(meter) <= budget + profile.prefix_bytes
    adaptive = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for grads in (static, adaptive):
        assert grads.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "args", "fragment"),
    [
        ("resnet1888", {}, "did you mean resnet18"),
        ("resnet18", {"model_args": {"bogus": 1}}, "unexpected keyword argument 'bogus'"),
        ("efficientformer_l1", {"img_size": 32}, "does not run on 32 px inputs"),
        ("resnet18", {"pretrained": "/no/such/weights.safetensors"}, "weights not found"),
        ("resnet18", {"model_args": {"num_classes": 3}}, "model_args may not set"),
    ],
)
def test_a_backbone_that_cannot_run_is_refused_at_validation(
    name: str, args: dict, fragment: str
) -> None:
    with pytest.raises(RegistryError, match=fragment):
        check_backbone(name, args)


def test_a_cnn_trains_with_lora_on_its_convolutions_under_adaptive() -> None:
    name, args = SMALL["resnet"]
    spec = _conv_lora_spec(name, args, "adaptive", images_per_class=12, steps=2, budget_mb=64)
    record = run_trial(spec, num_threads=1)
    assert record.status == "ok", record.error
    assert record.total_blocks == 4 and record.steps == 2
    assert 0 < record.params_trainable < record.params_total


@pytest.mark.parametrize(
    ("name", "args", "inside"),
    [
        # the wide pre-classifier of the head holds most parameters: the trunk is the chain
        ("cpubone_nano", {"img_size": 64}, "stages."),
        ("hgnetv2_b0", {"img_size": 64}, "stages."),
        # VGG's trunk is one sequence of plain layers: one block, never the head's ConvMlp
        ("vgg11", {"img_size": 64}, "features"),
    ],
)
def test_the_classification_head_is_never_the_chain(name: str, args: dict, inside: str) -> None:
    blocks = check_backbone(name, args).blocks
    assert blocks and all(not b.startswith(("head", "pre_logits")) for b in blocks)
    assert any(b.startswith(inside) for b in blocks)


def test_blocks_that_wrap_a_sequence_repeat_into_a_chain() -> None:
    """Xception's block1 ... block12 (a skip convolution beside a ``rep`` sequence) are
    containers' members, not nothing: the chain lies inside them, in forward order."""
    blocks = check_backbone("legacy_xception", {"img_size": 96}).blocks
    assert blocks[0].startswith("block1.") and blocks[-1].startswith("block12.")
    order = [int(b.split(".")[0].removeprefix("block")) for b in blocks]
    assert order == sorted(order) and set(order) == set(range(1, 13))


def test_dilated_convolutions_are_not_lora_targets() -> None:
    """peft's Conv2d LoRA ignores dilation: SKNet's dilated kernel branch is left out, the
    other convolutions adapted, and the trial runs."""
    args = {"img_size": 32, "model_args": {"layers": [1, 1, 1, 1]}}
    structure = check_backbone("skresnet18", args)
    model = create_backbone("skresnet18", num_classes=4, **args)
    dilated = {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d) and m.dilation != (1, 1)
    }
    assert dilated and structure.convs and not dilated & set(structure.convs)
    spec = _conv_lora_spec("skresnet18", args, "none", images_per_class=4, steps=1, budget_mb=256)
    record = run_trial(spec, num_threads=1)
    assert record.status == "ok", record.error


def _conv_lora_spec(
    name: str, args: dict, checkpointing: str, images_per_class: int, steps: int, budget_mb: int
) -> TrialSpec:
    """A short LoRA trial on ``name``'s convolutions, on 32 px synthetic data."""
    return TrialSpec(
        backbone=name,
        backbone_args=BACKBONES.resolve_args(name, args),
        method="lora",
        method_args={"r": 2, "convs": True},
        checkpointing=checkpointing,
        dataset="synthetic",
        dataset_args={"num_classes": 4, "images_per_class": images_per_class, "image_size": 32},
        train=TrainConfig(epochs=1, batch_size=8, max_steps=steps),
        budget_mb=budget_mb,
    )
