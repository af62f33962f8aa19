"""lbp_wht: exact forward, low-rank WHT backward, its trainable set, memory, checkpointing."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.workers.conftest import TINY_BACKBONES
from workers.backbones import classifier_name, create_backbone
from workers.checkpointing import apply_checkpointing
from workers.memory import ActivationMeter
from workers.methods import METHODS, MethodContext, apply_method
from workers.methods.lbp_wht import LowRankLinear, TokenGrid, can_reflect, walsh_bases
from workers.methods.lora import BLOCK_LINEARS
from workers.registry import RegistryError

ALL_BASES = 100  # an order above 2 * block - 1 keeps every basis: exact gradients
# gradients of the authors' LinearWHT (tests/fixtures/official/make_lbp_wht.py)
OFFICIAL = Path(__file__).parents[1] / "fixtures" / "official" / "lbp_wht.pt"


def _pair(backbone: str, args: dict, **backbone_args: int) -> tuple[nn.Module, nn.Module]:
    """(model under lbp_wht, plain model with the same weights and the same trainable set)."""
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=5, **backbone_args)
    plain = create_backbone(backbone, num_classes=5, **backbone_args)
    plain.load_state_dict(model.state_dict())
    ctx = MethodContext(classifier=classifier_name(model), total_steps=10)
    model = apply_method("lbp_wht", args, model, ctx).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, param in plain.named_parameters():
        param.requires_grad_(name in trainable)
    return model, plain


def _batch(size: int = 32, n: int = 4, dtype: torch.dtype = torch.float32):  # noqa: ANN202
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=gen, dtype=dtype)
    return x, torch.randint(0, 5, (n,), generator=gen)


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN202
    """Gradients of the input and of every parameter that got one, in train mode."""
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), y).backward()
    return x.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    model.train()
    meter = ActivationMeter(model)
    with meter:
        model(x).sum()
    return meter.peak_bytes


def _target_linears(model: nn.Module) -> list[nn.Linear]:
    return [
        m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and re.fullmatch(BLOCK_LINEARS, n)
    ]


# ---------------------------------------------------------------- the bases


@pytest.mark.parametrize(
    ("selection", "counts"), [("l1", [1, 3, 10, 36]), ("linf", [1, 4, 16, 64])]
)
def test_walsh_bases_are_orthogonal_low_pass_sets(selection: str, counts: list[int]) -> None:
    for order, count in zip((1, 2, 4, 8), counts, strict=True):
        bases = walsh_bases(8, order, selection)
        assert bases.shape == (count, 8, 8)
        flat = bases.reshape(len(bases), -1)
        assert torch.equal(flat @ flat.T, 64 * torch.eye(len(bases), dtype=flat.dtype))
    # basis (i, 0) holds the 1-D Walsh function w_i in its columns: i sign changes
    columns = walsh_bases(8, 8, "linf")[::8, :, 0]
    assert [int((c[1:] != c[:-1]).sum()) for c in columns] == list(range(8))
    assert walsh_bases(8, ALL_BASES).shape[0] == 64


# ---------------------------------------------------------------- 1. all bases: exact


@pytest.mark.parametrize(
    ("backbone", "size"),
    [("vit_test", 32), ("tiny_vit_test", 32), ("vit_test", 40), ("tiny_vit_test", 48)],
)
def test_all_bases_give_exact_gradients(backbone: str, size: int) -> None:
    # 40 px ViT: a 5x5 grid padded to 8x8; 48 px TinyViT: 6x6 and 3x3 grids padded
    model, plain = _pair(backbone, {"order": ALL_BASES, "padding": "zero"}, img_size=size)
    model.double(), plain.double()
    x, y = _batch(size, dtype=torch.float64)
    gx, grads = _grads(model, x, y)
    gx_plain, grads_plain = _grads(plain, x, y)
    assert grads.keys() == grads_plain.keys()
    assert any(n.endswith("attn.qkv.weight") for n in grads)
    torch.testing.assert_close(gx, gx_plain, rtol=1e-9, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_plain[name], rtol=1e-9, atol=1e-12, msg=name)


def test_low_rank_backward_is_the_projection_of_the_exact_one() -> None:
    # 1 class token + a 4x4 grid; order 2 keeps 3 of the 16 bases of a 4x4 block
    grid, bases = TokenGrid(1, 4, 4), walsh_bases(4, 2).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 17, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 17, 5, generator=gen, dtype=torch.float64)
    y = LowRankLinear.apply(x, weight, bias, grid, bases)
    grad_x, grad_w, grad_b = torch.autograd.grad(y, (x, weight, bias), g)
    # projector onto the kept bases over the 16 grid tokens; the class token is kept
    flat = bases.reshape(3, 16)
    proj = torch.block_diag(torch.ones(1, 1, dtype=torch.float64), flat.T @ flat / 16)
    g_low = proj @ g  # (17, 17) @ (2, 17, 5)
    torch.testing.assert_close(y, F.linear(x, weight, bias), rtol=0, atol=0)
    torch.testing.assert_close(grad_b, g.sum(dim=(0, 1)))  # the bias gradient is exact
    torch.testing.assert_close(grad_w, torch.einsum("bto,bti->oi", g_low, proj @ x))
    torch.testing.assert_close(grad_x, g_low @ weight)
    assert not torch.allclose(grad_w, torch.einsum("bto,bti->oi", g, x))


@pytest.mark.parametrize(
    ("backbone", "layer"),
    [("vit_test", "blocks.0.attn.qkv"), ("tiny_vit_test", "stages.1.blocks.0.attn.qkv")],
)
def test_low_order_changes_the_weight_gradients_of_the_model(backbone: str, layer: str) -> None:
    model, plain = _pair(backbone, {"order": 1})
    x, y = _batch()
    _, grads = _grads(model, x, y)
    _, grads_plain = _grads(plain, x, y)
    name = f"{layer}.weight"
    assert not torch.allclose(grads[name], grads_plain[name], rtol=1e-2, atol=1e-5)


# ---------------------------------------------------------------- 2. saved bytes


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_saved_activations_shrink_with_the_order(backbone: str) -> None:
    x, _ = _batch(n=8)
    saved = []
    for order in (1, 2, 3, 4):
        model, plain = _pair(backbone, {"order": order})
        saved.append(_saved_bytes(model, x))
    exact = _saved_bytes(plain, x)
    assert all(a < b for a, b in zip(saved, saved[1:], strict=False)), saved
    assert saved[-1] < exact, (saved, exact)


# ---------------------------------------------------------------- 3. forward unchanged


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_forward_is_exact(backbone: str) -> None:
    model, plain = _pair(backbone, {"order": 1})
    assert model.state_dict().keys() == plain.state_dict().keys()
    x, _ = _batch()
    for train in (True, False):
        model.train(train), plain.train(train)
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- 4. trainable set


def _closed_form(model: nn.Module, train_norms: bool) -> int:
    """sum over target linears (out*in + out) + block LayerNorms 2*dim + head."""
    linears = sum(m.out_features * (m.in_features + 1) for m in _target_linears(model))
    norms = sum(
        2 * m.normalized_shape[0]
        for n, m in model.named_modules()
        if isinstance(m, nn.LayerNorm) and re.search(r"(^|\.)blocks\.\d+\.", n)
    )
    head = model.get_submodule(classifier_name(model))
    return linears + norms * train_norms + head.out_features * (head.in_features + 1)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
@pytest.mark.parametrize("train_norms", [True, False])
def test_trainable_set_is_the_closed_form(backbone: str, train_norms: bool) -> None:
    model, _ = _pair(backbone, {"train_norms": train_norms})
    head = classifier_name(model)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == _closed_form(model, train_norms)
    for name in trainable:
        linear = re.fullmatch(BLOCK_LINEARS + r"\.(weight|bias)", name)
        norm = re.search(r"blocks\.\d+\.(norm\d|attn\.norm|mlp\.norm)\.", name)
        assert linear or (norm and train_norms) or name.startswith(head + "."), name
    assert not any("patch_embed" in n or "pos_embed" in n or "cls_token" in n for n in trainable)
    # exactly the trainable parameters get gradients
    x, y = _batch()
    _, grads = _grads(model, x, y)
    assert set(grads) == set(trainable)
    if backbone == "vit_test" and train_norms:  # depth 4, dim 64, MLP 256, 5 classes
        per_block = 64 * 192 + 192 + 64 * 64 + 64 + 64 * 256 + 256 + 256 * 64 + 64 + 2 * 2 * 64
        assert sum(trainable.values()) == 4 * per_block + 64 * 5 + 5


# ---------------------------------------------------------------- 5. it learns


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_a_few_steps_lower_the_loss(backbone: str) -> None:
    model, _ = _pair(backbone, {"order": 2})
    model.train()
    x, y = _batch(n=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------- 6. checkpointing


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_composes_with_static_checkpointing(backbone: str) -> None:
    model, _ = _pair(backbone, {"order": 2})
    checkpointed, _ = _pair(backbone, {"order": 2})
    assert apply_checkpointing("static", {}, checkpointed)
    assert apply_checkpointing("none", {}, model) == []
    x, y = _batch(n=8)
    gx, grads = _grads(model, x, y)
    gx_ckpt, grads_ckpt = _grads(checkpointed, x, y)
    assert grads.keys() == grads_ckpt.keys() and grads
    torch.testing.assert_close(gx, gx_ckpt, rtol=1e-5, atol=1e-7)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ckpt[name], rtol=1e-5, atol=1e-7, msg=name)
    assert _saved_bytes(checkpointed, x) < _saved_bytes(model, x)


# ---------------------------------------------------------------- 7. arguments


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ({"order": 0}, "order must be >= 1, got 0"),
        ({"block": 6}, "block must be a power of two >= 2, got 6"),
        ({"block": 1}, "got 1"),
        ({"selection": "l2"}, "selection must be one of .* got 'l2'"),
        ({"padding": "circular"}, "padding must be one of .* got 'circular'"),
        ({"target": "blocks.(qkv"}, "not a valid regular expression"),
        ({"order": "four"}, "must be int"),
        ({"rank": 4}, "unknown argument"),
    ],
)
def test_bad_arguments_are_rejected(args: dict, fragment: str) -> None:
    with pytest.raises(RegistryError, match=fragment):
        METHODS.resolve_args("lbp_wht", args)


def test_defaults_are_the_papers() -> None:
    args = METHODS.resolve_args("lbp_wht", {})
    assert (args["order"], args["block"], args["selection"]) == (4, 8, "l1")
    assert args["padding"] == "reflect"  # the authors' LinearWHTOp


# ---------------------------------------------------------------- the authors' operator


def _official_case(case: str, order: int, padding: str, bases_order: int | None = None):  # noqa: ANN202
    """Our gradients (x, W, b) on a fixture case, and the authors' at ``order``."""
    c = torch.load(OFFICIAL, weights_only=True)[case]
    grid = TokenGrid(c["extra_tokens"], c["h"], c["w"])
    x, w, b = (c[k].double().requires_grad_(True) for k in ("x", "weight", "bias"))
    bases = walsh_bases(8, bases_order or order).double()
    y = LowRankLinear.apply(x, w, b, grid, bases, padding)
    ours = torch.autograd.grad(y, (x, w, b), c["grad_y"].double())
    theirs = [c[f"{k}_lp{order}"].double() for k in ("grad_x", "grad_weight", "grad_bias")]
    return ours, theirs, (x, w, b, c["grad_y"].double())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("case", "order"),
    [
        ("vit_s16_224", 2),  # 1 class token + 14 x 14: padded to 16 x 16, one row each side
        ("vit_s16_224", 4),
        ("vit_s16_224", 8),
        ("tiny_vit_window_7x7", 2),  # padded to 8 x 8: one row/column at the top/left
        ("tiny_vit_window_7x7", 4),
        ("tiny_vit_window_7x7", 8),
        ("tiny_vit_mlp_28x28", 4),  # padded to 32 x 32: two each side
    ],
)
def test_reflect_padding_gives_the_authors_gradients(case: str, order: int) -> None:
    ours, theirs, _ = _official_case(case, order, "reflect")
    for name, a, b in zip(("grad x", "grad W", "grad b"), ours, theirs, strict=True):
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))
    # zero padding is a different operator on these grids (weight gradients differ)
    zero, _, _ = _official_case(case, order, "zero")
    assert _rel(zero[1], theirs[1]) > 1e-2


@pytest.mark.parametrize("case", ["vit_s16_224", "tiny_vit_window_7x7"])
def test_with_every_basis_zero_padding_is_exact_and_reflection_is_not(case: str) -> None:
    zero, _, (x, w, b, g) = _official_case(case, 8, "zero", bases_order=ALL_BASES)
    reflect, _, _ = _official_case(case, 8, "reflect", bases_order=ALL_BASES)
    exact = torch.autograd.grad(F.linear(x, w, b), (x, w, b), g)
    for ours, truth in zip(zero, exact, strict=True):
        torch.testing.assert_close(ours, truth, rtol=1e-9, atol=1e-12)
    assert _rel(reflect[1], exact[1]) > 1e-2


def test_a_grid_too_thin_to_reflect_is_known() -> None:
    assert can_reflect(TokenGrid(1, 14, 14), 8) and can_reflect(TokenGrid(0, 7, 7), 8)
    assert can_reflect(TokenGrid(0, 3, 3), 4)
    assert not can_reflect(TokenGrid(0, 1, 3), 4)  # 3 rows of padding around 1 row


# ---------------------------------------------------------------- no grid: exact


class _Toy(nn.Module):
    """One block whose MLP sees 7 tokens: no grid fits, so backprop stays exact."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].mlp = nn.Module()
        self.blocks[0].mlp.fc1 = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks[0].mlp.fc1(x).mean(dim=1))


def test_layer_without_a_grid_falls_back_to_exact(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    toy, plain = _Toy(), _Toy()
    plain.load_state_dict(toy.state_dict())
    apply_method("lbp_wht", {"order": 1}, toy, MethodContext(classifier="head", total_steps=1))
    x = torch.randn(2, 7, 8)
    with caplog.at_level(logging.WARNING, logger="workers.methods.lbp_wht"):
        toy(x).sum().backward()
    plain(x).sum().backward()
    assert "blocks.0.mlp.fc1" in caplog.text and "exact backprop" in caplog.text
    fc1, fc1_plain = toy.blocks[0].mlp.fc1, plain.blocks[0].mlp.fc1
    torch.testing.assert_close(fc1.weight.grad, fc1_plain.weight.grad)


def test_low_rank_linear_saves_no_full_input() -> None:
    x = torch.randn(2, 17, 16, requires_grad=True)  # 1 class token + 4x4 grid
    weight = torch.randn(8, 16, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LowRankLinear.apply(x, weight, None, TokenGrid(1, 4, 4), walsh_bases(4, 2).float()).sum()
    sizes = sorted(t.numel() for t in saved if t is not weight)
    assert sizes == [2 * 1 * 16, 2 * 3 * 16]  # the class token, 3 coefficients per channel
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in saved)
