"""PEFT methods: what each trains, and that adapters start as the identity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.workers.conftest import TINY_BACKBONES
from workers.backbones import classifier_name, create_backbone
from workers.methods import METHODS, MethodContext, apply_method
from workers.registry import RegistryError


def _adapt(backbone: str, method: str, args: dict | None = None) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = create_backbone(backbone, num_classes=5)
    reference = create_backbone(backbone, num_classes=5)
    reference.load_state_dict(base.state_dict())
    ctx = MethodContext(classifier=classifier_name(base), total_steps=10)
    return apply_method(method, args, base, ctx).model, reference


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_registered_methods() -> None:
    assert {"full", "lora", "bitfit"} <= set(METHODS.names())


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_full_trains_everything(backbone: str) -> None:
    model, _ = _adapt(backbone, "full")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_bitfit_trains_biases_and_head_only(backbone: str) -> None:
    model, _ = _adapt(backbone, "bitfit")
    head = classifier_name(model)
    names = _trainable(model)
    assert names and all(n.endswith(".bias") or n.startswith(head + ".") for n in names)
    assert f"{head}.weight" in names
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert set(biases) <= set(names)


def test_bitfit_train_norm_adds_layernorm_weights() -> None:
    model, _ = _adapt("vit_test", "bitfit", {"train_norm": True})
    assert "blocks.0.norm1.weight" in _trainable(model)
    assert "blocks.0.attn.qkv.weight" not in _trainable(model)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_lora_wraps_block_linears_only_and_starts_as_identity(backbone: str) -> None:
    model, reference = _adapt(backbone, "lora", {"r": 4})
    names = _trainable(model)
    lora_params = [n for n in names if ".lora_" in n]
    assert lora_params and all("blocks." in n for n in lora_params)
    assert not any("patch_embed" in n for n in lora_params)
    # every trainable parameter is an adapter or the (saved) head
    assert all(".lora_" in n or "head" in n for n in names)
    wrapped = {n.split(".lora_")[0] for n in lora_params}
    n_blocks = sum(
        1 for n, _ in reference.named_modules() if n.endswith(".attn") and "blocks." in n
    )
    assert len(wrapped) == 4 * n_blocks  # qkv, proj, fc1, fc2 of every attention block
    # B starts at zero: the adapted model computes what the base model computes
    x = torch.randn(3, 3, 32, 32)
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-6)


def test_lora_rank_is_the_argument() -> None:
    model, _ = _adapt("vit_test", "lora", {"r": 3})
    a = dict(model.named_parameters())["base_model.model.blocks.0.attn.qkv.lora_A.default.weight"]
    assert a.shape == (3, 64)


@pytest.mark.parametrize(
    ("method", "args", "fragment"),
    [
        ("lora", {"r": 0}, "r must be >= 1"),
        ("lora", {"rank": 4}, "unknown argument"),
        ("lora", {"r": "eight"}, "must be int"),
        ("bitfit", {"train_norm": "yes"}, "must be bool"),
        ("full", {"lr": 1}, "it takes none"),
    ],
)
def test_bad_method_arguments_are_rejected(method: str, args: dict, fragment: str) -> None:
    with pytest.raises(RegistryError, match=fragment):
        METHODS.resolve_args(method, args)
