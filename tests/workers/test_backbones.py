"""Backbone registry: real variants match the published sizes, local weights load safely."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.workers.conftest import TINY_CNN_BACKBONES
from workers.backbones import (
    BACKBONES,
    INVERTED_RESIDUAL,
    classifier_name,
    create_backbone,
    family,
    input_size,
)
from workers.registry import RegistryError

# Parameter counts at 1000 classes as published for the pretrained models (the
# MobileNets' as timm builds them: 3.5M and 5.5M in the papers).
PUBLISHED_PARAMS = {
    "vit_small_patch16_224": 22_050_664,
    "tiny_vit_5m_224": 5_392_764,
    "mobilenetv2_100": 3_504_872,
    "mobilenetv3_large_100": 5_483_032,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_real_variants_have_the_published_size(name: str) -> None:
    model = create_backbone(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    assert input_size(model) == 224


@pytest.mark.parametrize(("name", "head"), [("vit_test", "head"), ("tiny_vit_test", "head.fc")])
def test_tiny_variants_classify_at_their_resolution(name: str, head: str) -> None:
    model = create_backbone(name, num_classes=7)
    assert input_size(model) == 32 and classifier_name(model) == head
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert sum(p.numel() for p in model.parameters()) < 500_000


@pytest.mark.parametrize("name", TINY_CNN_BACKBONES)
def test_tiny_mobilenets_classify_at_their_resolution(name: str) -> None:
    model = create_backbone(name, num_classes=7)
    assert input_size(model) == 32 and classifier_name(model) == "classifier"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert sum(p.numel() for p in model.parameters()) < 300_000
    assert family(name) == INVERTED_RESIDUAL


@pytest.mark.parametrize(
    ("name", "acts"),
    [
        ("mobilenetv2_test", {nn.ReLU6}),
        ("mobilenetv3_test", {nn.ReLU, nn.Hardswish, nn.Hardsigmoid}),
    ],
)
def test_tiny_mobilenets_use_timms_inverted_residual_blocks(name: str, acts: set) -> None:
    from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite

    model = create_backbone(name, num_classes=3)
    kinds = {type(m) for m in model.modules()}
    assert InvertedResidual in kinds and any(issubclass(k, nn.BatchNorm2d) for k in kinds)
    assert {k for k in kinds if k in {nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid}} == acts
    assert (SqueezeExcite in kinds) == (name == "mobilenetv3_test")


@pytest.mark.parametrize("name", ["mobilenetv2_100", "mobilenetv3_large_100"])
def test_real_mobilenets_take_any_resolution(name: str) -> None:
    model = create_backbone(name, num_classes=3, img_size=64)
    assert input_size(model) == 64 and classifier_name(model) == "classifier"
    assert family(name) == INVERTED_RESIDUAL
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_img_size_argument_resizes_the_vit() -> None:
    model = create_backbone("vit_test", num_classes=3, img_size=16)
    assert input_size(model) == 16
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 3)


def test_unknown_backbone_lists_the_valid_names() -> None:
    with pytest.raises(RegistryError, match="valid: .*tiny_vit_test.*vit_test"):
        create_backbone("resnet9000", num_classes=2)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped-pth"])
def test_local_weights_load_and_head_is_resized(tmp_path: Path, fmt: str) -> None:
    source = create_backbone("vit_test", num_classes=10)
    state = source.state_dict()
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state} if fmt == "wrapped-pth" else state, path)
    model = create_backbone("vit_test", num_classes=4, pretrained=str(path))
    loaded = model.state_dict()
    assert torch.equal(loaded["blocks.2.attn.qkv.weight"], state["blocks.2.attn.qkv.weight"])
    assert loaded["head.weight"].shape == (4, 64)  # new head, not the checkpoint's 10 classes


def test_mismatched_checkpoint_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(create_backbone("tiny_vit_test", num_classes=10).state_dict(), path)
    with pytest.raises(RuntimeError, match="does not match the model"):
        create_backbone("vit_test", num_classes=10, pretrained=str(path))


def test_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        create_backbone("vit_test", num_classes=10, pretrained=str(tmp_path / "nowhere.pth"))


class _Payload:
    def __reduce__(self):  # noqa: ANN204 - what a malicious checkpoint would do
        return (print, ("executed",))


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model": _Payload()}, fh)
    with pytest.raises(pickle.UnpicklingError):
        create_backbone("vit_test", num_classes=10, pretrained=str(path))


def test_registry_rejects_duplicates() -> None:
    with pytest.raises(RegistryError, match="already registered"):
        BACKBONES.register(name="vit_test")(lambda config, num_classes: None)
