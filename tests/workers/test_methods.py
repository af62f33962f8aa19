"""PEFT methods, as one table over every method x every applicable tiny backbone.

For each case: only the intended parameters train and receive gradients, their
number equals the method's closed form computed here from the architecture,
training lowers the loss on a fixed batch, and a method whose update starts at zero
computes what the base model computes. Mechanism tests of the methods with their
own machinery live in test_lbp_wht.py, test_mobiletl.py and test_snella.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.workers.conftest import TINY_BACKBONES, TINY_CNN_BACKBONES
from tests.workers.test_mamba import TINY_MAMBA_BACKBONES
from tests.workers.test_mobiletl import closed_form as mobiletl_closed_form
from workers.backbones import classifier_name, create_backbone
from workers.methods import METHODS, MethodContext, apply_method, check_applicable
from workers.methods.qlora import dequantized_weight
from workers.registry import RegistryError

ALL_TINY = TINY_BACKBONES + TINY_CNN_BACKBONES + TINY_MAMBA_BACKBONES
# the linear layers every adapter method targets: attention and MLP projections of
# transformer blocks (MambaVision's attention is its blocks' "mixer"); the in/x/dt/out
# projections of Mamba mixers (Vim's blocks are "layers", with a backward branch "_b")
_BLOCK_LINEAR = re.compile(
    r"(.*\.)?(blocks|layers)\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2"
    r"|mixer\.(qkv|proj|in_proj|out_proj|x_proj|x_proj_b|dt_proj|dt_proj_b))"
)


def _block_linears(model: nn.Module) -> list[nn.Linear]:
    return [
        m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and _BLOCK_LINEAR.fullmatch(n)
    ]


def _head_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.get_submodule(classifier_name(model)).parameters())


def _inner_outer(model: nn.Module) -> int:
    return sum(m.in_features + m.out_features for m in _block_linears(model))


def _is_head(name: str, model: nn.Module) -> bool:
    head = classifier_name(model)
    return name.startswith(head + ".") or f".{head}." in name


# ---------------------------------------------------------------- closed forms


def _full(ref: nn.Module, args: dict) -> int:
    return sum(p.numel() for p in ref.parameters())


def _bitfit(ref: nn.Module, args: dict) -> int:
    biases = sum(p.numel() for n, p in ref.named_parameters() if n.endswith(".bias"))
    head = classifier_name(ref)
    return biases + ref.get_submodule(head).weight.numel()


def _lora(ref: nn.Module, args: dict) -> int:
    """r (in + out) per adapted linear: A is r x in, B is out x r."""
    return args["r"] * _inner_outer(ref) + _head_params(ref)


def _adalora(ref: nn.Module, args: dict) -> int:
    """init_r (in + out + 1) per adapted linear: P, Q and the singular values E."""
    return args["init_r"] * (_inner_outer(ref) + len(_block_linears(ref))) + _head_params(ref)


def _snella(ref: nn.Module, args: dict) -> int:
    """r (in + rows) per kernel (the two factors it merges) and its learnable scalars;
    a split qkv is three kernels (q, k, v rows), any other linear one; "scaled" adds a
    scale per linear."""
    linears = [n for n, m in ref.named_modules() if _BLOCK_LINEAR.fullmatch(n)]
    kernels = [3 if args["qkv"] == "split" and n.endswith("qkv") else 1 for n in linears]
    inner = sum(k * ref.get_submodule(n).in_features for k, n in zip(kernels, linears, strict=True))
    outer = sum(ref.get_submodule(n).out_features for n in linears)
    scalars = (3 if args["kernel"] == "mixed" else 0) * sum(kernels)
    scales = len(linears) if args["update"] == "scaled" else 0
    return args["r"] * (inner + outer) + scalars + scales + _head_params(ref)


def _lbp_wht(ref: nn.Module, args: dict) -> int:
    """The adapted linears (back-propagated in low rank), the blocks' LayerNorms, the head."""
    linears = sum(p.numel() for m in _block_linears(ref) for p in m.parameters())
    norms = sum(
        p.numel()
        for n, m in ref.named_modules()
        if isinstance(m, nn.LayerNorm) and re.search(r"blocks\.\d+\.", n)
        for p in m.parameters()
    )
    return linears + (norms if args["train_norms"] else 0) + _head_params(ref)


def _mobiletl(ref: nn.Module, args: dict) -> int:
    """Top-k inverted-residual blocks: convs, inner norm shifts, output norm; all above."""
    return mobiletl_closed_form(ref, args["top_k"], args["vanilla"])


@dataclass(frozen=True)
class Case:
    method: str
    args: dict
    closed_form: Callable[[nn.Module, dict], int]
    intended: Callable[[str, nn.Module], bool]  # trainable parameter name (adapted model)
    zero_start: bool  # the update starts at zero: adapted == base before the first step
    steps: int = 8
    lr: float = 5e-3


CASES = [
    Case("full", {}, _full, lambda n, m: True, zero_start=True, lr=1e-3),
    Case(
        "bitfit",
        {},
        _bitfit,
        lambda n, m: n.endswith(".bias") or _is_head(n, m),
        zero_start=True,
        lr=2e-2,
    ),
    Case("lora", {"r": 4}, _lora, lambda n, m: ".lora_" in n or _is_head(n, m), zero_start=True),
    Case(
        "adalora",
        {"init_r": 6, "target_r": 3},
        _adalora,
        lambda n, m: ".lora_" in n or _is_head(n, m),
        zero_start=True,
    ),
    Case(
        "qlora",
        {"r": 4, "compute_dtype": "fp32", "dropout": 0.0},
        _lora,
        lambda n, m: ".lora_" in n or _is_head(n, m),
        zero_start=True,
    ),
    Case(
        "snella",
        {"r": 4},
        _snella,
        lambda n, m: ".snella_" in n or _is_head(n, m),
        zero_start=False,  # the reference's update starts from the random kernel
    ),
    Case(
        "lbp_wht",
        {},
        _lbp_wht,
        lambda n, m: bool(re.search(r"blocks\.\d+\.", n)) or _is_head(n, m),
        zero_start=False,
        lr=1e-3,
    ),
    Case("mobiletl", {"top_k": 2}, _mobiletl, lambda n, m: True, zero_start=False, lr=1e-3),
]
# "full" and "bitfit" leave the model as it is: "zero start" holds trivially for them


def _table() -> list[tuple[Case, str]]:
    out = []
    for case in CASES:
        for backbone in ALL_TINY:
            try:
                check_applicable(case.method, backbone)
            except RegistryError:
                continue
            out.append(pytest.param(case, backbone, id=f"{case.method}-{backbone}"))
    return out


TABLE = _table()


def _adapt(case: Case, backbone: str):  # noqa: ANN202
    torch.manual_seed(0)
    base = create_backbone(backbone, num_classes=5)
    reference = create_backbone(backbone, num_classes=5)
    reference.load_state_dict(base.state_dict())
    ctx = MethodContext(classifier=classifier_name(base), total_steps=case.steps)
    return apply_method(case.method, case.args, base, ctx), reference


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 5, (8,), generator=gen)


def test_every_seed_paper_method_is_registered() -> None:
    expected = {"full", "lora", "adalora", "qlora", "bitfit", "snella", "lbp_wht", "mobiletl"}
    assert expected <= set(METHODS.names())
    assert {c.method for c in CASES} == expected


def test_table_covers_every_family() -> None:
    by_method: dict[str, set[str]] = {}
    for param in TABLE:
        case, backbone = param.values
        by_method.setdefault(case.method, set()).add(backbone)
    assert by_method["full"] == set(ALL_TINY)
    assert by_method["mobiletl"] == set(TINY_CNN_BACKBONES)
    assert by_method["lora"] == set(TINY_BACKBONES + TINY_MAMBA_BACKBONES)
    assert by_method["lbp_wht"] == set(TINY_BACKBONES)  # a token grid: transformers only


@pytest.mark.parametrize(("case", "backbone"), TABLE)
def test_trainable_parameters_match_closed_form(case: Case, backbone: str) -> None:
    adapted, reference = _adapt(case, backbone)
    model = adapted.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names
    assert all(case.intended(n, reference) for n in names), names
    expected = case.closed_form(reference, METHODS.resolve_args(case.method, case.args))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize(("case", "backbone"), TABLE)
def test_only_intended_parameters_receive_gradients(case: Case, backbone: str) -> None:
    adapted, _ = _adapt(case, backbone)
    model = adapted.model.train()
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable


@pytest.mark.parametrize(("case", "backbone"), TABLE)
def test_training_steps_lower_the_loss(case: Case, backbone: str) -> None:
    adapted, _ = _adapt(case, backbone)
    model = adapted.model.train()
    x, y = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=case.lr, weight_decay=0.0)
    losses = []
    for step in range(1, case.steps + 1):
        loss = F.cross_entropy(model(x), y)
        objective = loss + adapted.regularizer() if adapted.regularizer else loss
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
        if adapted.on_optimizer_step:
            adapted.on_optimizer_step(step)
        losses.append(loss.item())
    with torch.no_grad():  # train mode: batch statistics, as during the steps
        final = F.cross_entropy(model(x), y).item()
    assert final < 0.7 * losses[0], (losses, final)


def _dequantized_reference(reference: nn.Module, adapted: nn.Module) -> nn.Module:
    """``reference`` with each block linear replaced by the weight that QLoRA computes with."""
    layers = dict(adapted.named_modules())
    with torch.no_grad():
        for name, module in reference.named_modules():
            quantized = layers.get(f"base_model.model.{name}.base_layer")
            if quantized is not None and hasattr(quantized.weight, "quant_state"):
                module.weight.copy_(dequantized_weight(quantized))
    return reference


@pytest.mark.parametrize(("case", "backbone"), [p for p in TABLE if p.values[0].zero_start])
def test_update_starts_at_zero(case: Case, backbone: str) -> None:
    adapted, reference = _adapt(case, backbone)
    if case.method == "qlora":  # the base of QLoRA is the quantized model
        reference = _dequantized_reference(reference, adapted.model)
    model = adapted.model.eval()
    reference.eval()
    x, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "adalora"])
@pytest.mark.parametrize("backbone", TINY_BACKBONES + TINY_MAMBA_BACKBONES)
def test_merged_and_unmerged_outputs_agree(method: str, backbone: str) -> None:
    case = next(c for c in CASES if c.method == method)
    adapted, _ = _adapt(case, backbone)
    model = adapted.model.eval()
    x, y = _batch()
    with torch.no_grad():
        initial = model(x)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 4):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if adapted.on_optimizer_step:
            adapted.on_optimizer_step(step)
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        merged = model(x)
        model.unmerge_adapter()
        again = model(x)
    assert (unmerged - initial).abs().max() > 1e-3  # the adapters did change something
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_qlora_base_is_nf4_within_tolerance(backbone: str) -> None:
    """Every quantized weight is within 10% (relative Frobenius) of its fp32 original:
    NF4 with blocks of 64 measures 0.09 on normally distributed weights."""
    case = next(c for c in CASES if c.method == "qlora")
    adapted, reference = _adapt(case, backbone)
    layers = dict(adapted.model.named_modules())
    errors = []
    for name, module in reference.named_modules():
        quantized = layers.get(f"base_model.model.{name}.base_layer")
        if quantized is None or not hasattr(quantized.weight, "quant_state"):
            continue
        assert quantized.weight.dtype == torch.uint8  # 2 weights per byte
        assert quantized.weight.numel() * 2 == module.weight.numel()
        w = module.weight
        errors.append(((dequantized_weight(quantized) - w).norm() / w.norm()).item())
    assert len(errors) == len(_block_linears(reference))
    assert 0.0 < max(errors) < 0.10


def test_adalora_ends_at_the_target_budget() -> None:
    case = Case("adalora", {"init_r": 6, "target_r": 3}, _adalora, lambda n, m: True, True, 10)
    adapted, reference = _adapt(case, "vit_test")
    model = adapted.model.train()
    x, y = _batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, case.steps + 1):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        adapted.on_optimizer_step(step)
    pattern = model.peft_config["default"].rank_pattern
    kept = sum(sum(mask) for mask in pattern.values())
    assert len(pattern) == len(_block_linears(reference))
    assert kept == 3 * len(pattern)  # the budget: target_r per layer on average
    assert any(sum(mask) != 3 for mask in pattern.values())  # layers competed


def test_adalora_regulariser_penalises_non_orthogonal_factors() -> None:
    case = next(c for c in CASES if c.method == "adalora")
    adapted, _ = _adapt(case, "vit_test")
    before = adapted.regularizer().item()
    with torch.no_grad():
        for name, p in adapted.model.named_parameters():
            if ".lora_A." in name:  # rows orthonormal: P P^T = I
                q, _ = torch.linalg.qr(p.T)
                p.copy_(q.T)
            elif ".lora_B." in name:
                q, _ = torch.linalg.qr(p)
                p.copy_(q)
    assert before > 0.01
    assert adapted.regularizer().item() < 1e-4


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("method", "args", "fragment"),
    [
        ("lora", {"r": 0}, "r must be >= 1"),
        ("lora", {"rank": 4}, "unknown argument"),
        ("lora", {"r": "eight"}, "must be int"),
        ("lora", {"target": "blocks.(qkv"}, "not a valid regular expression"),
        ("bitfit", {"train_norm": "yes"}, "must be bool"),
        ("full", {"lr": 1}, "it takes none"),
        ("adalora", {"target_r": 16}, "target_r must be in"),
        ("adalora", {"warmup_fraction": 0.6, "final_fraction": 0.5}, "must be < 1"),
        ("qlora", {"quant_type": "int4"}, "quant_type must be nf4 or fp4"),
        ("qlora", {"compute_dtype": "fp8"}, "compute_dtype must be one of"),
        ("qlora", {"target": "blocks.("}, "not a valid regular expression"),
    ],
)
def test_bad_method_arguments_are_rejected(method: str, args: dict, fragment: str) -> None:
    with pytest.raises(RegistryError, match=fragment):
        METHODS.resolve_args(method, args)


def test_method_on_a_foreign_family_is_named_with_the_alternatives() -> None:
    with pytest.raises(RegistryError, match="'lora' does not apply to backbone 'mobilenetv2_test'"):
        check_applicable("lora", "mobilenetv2_test")
    fragment = "inverted-residual blocks.*applies to: .*mobilenetv2_100"
    with pytest.raises(RegistryError, match=fragment):
        check_applicable("mobiletl", "vit_test")


def test_what_a_method_needs_is_read_from_the_structure() -> None:
    """lora on a CNN needs `convs: true`; mobiletl's top_k is checked against the blocks."""
    with pytest.raises(RegistryError, match="only convolutions: set `convs: true`"):
        check_applicable("lora", "resnet18", {}, {"img_size": 32})
    check_applicable("lora", "resnet18", {"convs": True}, {"img_size": 32})
    with pytest.raises(RegistryError, match="needs attention blocks"):
        check_applicable("lbp_wht", "resnet18", {}, {"img_size": 32})
    check_applicable("lbp_wht", "swin_tiny_patch4_window7_224", {}, {})
    with pytest.raises(RegistryError, match="top_k=9 exceeds its 8 inverted residual"):
        check_applicable("mobiletl", "mobilenetv2_test", {"top_k": 9})


def test_bitfit_train_norm_adds_layernorm_weights() -> None:
    case = Case("bitfit", {"train_norm": True}, _bitfit, lambda n, m: True, True)
    adapted, _ = _adapt(case, "vit_test")
    names = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert "blocks.0.norm1.weight" in names
    assert "blocks.0.attn.qkv.weight" not in names


def test_lora_rank_is_the_argument() -> None:
    case = next(c for c in CASES if c.method == "lora")
    adapted, _ = _adapt(replace(case, args={"r": 3}), "vit_test")
    a = dict(adapted.model.named_parameters())[
        "base_model.model.blocks.0.attn.qkv.lora_A.default.weight"
    ]
    assert a.shape == (3, 64)
