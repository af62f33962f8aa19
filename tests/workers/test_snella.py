"""SNELLA: the reference's update and allocation, what it trains, kernel rank, sparsity
allocation and schedule, our options."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from orchestrator.spec import TrainConfig, TrialSpec
from tests.workers.conftest import TINY_BACKBONES
from tests.workers.test_trial import SYNTH
from workers import trial as trial_module
from workers.backbones import classifier_name, create_backbone
from workers.checkpointing import apply_checkpointing
from workers.data import ImageData
from workers.methods import METHODS, Adapted, MethodContext, apply_method
from workers.methods.lora import BLOCK_LINEARS
from workers.methods.snella import (
    SnellaAllocator,
    SnellaArgs,
    SnellaKernel,
    SnellaLinear,
    allocate,
    distance_kernel,
    final_keep_for,
    keep_schedule,
)
from workers.registry import RegistryError
from workers.trial import run_trial

N_CLASSES = 5
OURS = {"update": "scaled", "qkv": "fused", "schedule": "step", "zero_scores": "size"}
# the authors' updates and allocation (tests/fixtures/official/make_snella.py)
OFFICIAL = Path(__file__).parents[1] / "fixtures" / "official" / "snella.pt"


def _adapt(
    backbone: str,
    args: dict | None = None,
    total_steps: int = 10,
    steps_per_epoch: int = 0,
    dataset: str = "",
) -> tuple[Adapted, nn.Module]:
    torch.manual_seed(0)
    base = create_backbone(backbone, num_classes=N_CLASSES)
    reference = copy.deepcopy(base)
    ctx = MethodContext(classifier_name(base), total_steps, dataset, steps_per_epoch)
    return apply_method("snella", args, base, ctx), reference


def _layers(model: nn.Module) -> dict[str, SnellaLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SnellaLinear)}


def _kept(layer: SnellaLinear) -> int:
    return round(sum(p.keep_ratio * p.size for p in layer.snella_parts))


def _allocator(adapted: Adapted) -> SnellaAllocator:
    return adapted.on_optimizer_step.__self__


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(
        0, N_CLASSES, (n,), generator=gen
    )


def _set_scales(model: nn.Module, value: float) -> None:
    """A nonzero scale (update "scaled"), as after some training: the factors then learn."""
    with torch.no_grad():
        for layer in _layers(model).values():
            layer.snella_scale.fill_(value)


def _step(adapted: Adapted, optimizer: torch.optim.Optimizer, step: int) -> float:
    x, y = _batch()
    loss = F.cross_entropy(adapted.model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    adapted.on_optimizer_step(step)
    return loss.item()


def _optimizer(model: nn.Module, lr: float = 1e-2) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


# ---------------------------------------------------------------- the authors' code


def _official_vit() -> tuple[Adapted, dict]:
    """A one-block ViT (dim 16, MLP 64) under default snella r=8, its kernels loaded with
    the fixture's; a 4-epoch run of 2 steps per epoch, on CIFAR-100 (final keep 0.2)."""
    fixture = torch.load(OFFICIAL, weights_only=True)
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    vit.reset_classifier(N_CLASSES)
    ctx = MethodContext("head", total_steps=8, dataset="cifar100", steps_per_epoch=2)
    adapted = apply_method("snella", {"r": 8}, vit.double(), ctx)
    for name, part in _official_parts(adapted).items():
        theirs = fixture["params"][name]
        with torch.no_grad():
            part.A.copy_(torch.cat(list(theirs["In_Qs"]), dim=1))  # (2, in, 4) -> (in, 8)
            part.B.copy_(torch.cat(list(theirs["Out_Qs"]), dim=1))
            for scalar in ("alpha", "gamma", "beta"):
                getattr(part, scalar).copy_(theirs[scalar][0])
    return adapted, fixture


def _official_parts(adapted: Adapted) -> dict[str, SnellaKernel]:
    """The fixture's layer names -> our kernels (q, k, v are the split qkv's)."""
    parts = _allocator(adapted).parts
    names = {"q": "attn.qkv.q", "k": "attn.qkv.k", "v": "attn.qkv.v", "proj": "attn.proj"}
    names |= {"fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    return {theirs: parts[f"blocks.0.{ours}"] for theirs, ours in names.items()}


def _official_updates(adapted: Adapted) -> dict[str, torch.Tensor]:
    """Our delta weights cut as the fixture's layers (qkv rows: q, then k, then v)."""
    layers = _layers(adapted.model)
    qkv = layers["blocks.0.attn.qkv"].delta_weight()
    out = dict(zip("qkv", qkv.chunk(3), strict=True))
    out["proj"] = layers["blocks.0.attn.proj"].delta_weight()
    out["fc1"] = layers["blocks.0.mlp.fc1"].delta_weight()
    out["fc2"] = layers["blocks.0.mlp.fc2"].delta_weight()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_official_updates_and_allocation_equal_the_reference() -> None:
    adapted, fixture = _official_vit()
    with torch.no_grad():
        for name, update in _official_updates(adapted).items():  # epoch 0: keep 0.99
            assert _rel(update, fixture["update_epoch0"][name]) < 1e-5, name
    parts = _official_parts(adapted)
    for step, grads in enumerate(fixture["grads"], start=1):
        for name, part in parts.items():
            part.A.grad = torch.cat(list(grads[f"{name}.In_Qs"]), dim=1).double()
            part.B.grad = torch.cat(list(grads[f"{name}.Out_Qs"]), dim=1).double()
        adapted.on_optimizer_step(step)
        if step == 1:  # within epoch 0: the budget holds
            assert {p.keep_ratio for p in parts.values()} == {0.99}
    # step 2 ends epoch 0: the reference's update(model, 1) moved the budget
    for name, part in parts.items():
        assert round(part.keep_ratio * part.size) == fixture["volume_epoch1"][name], name
        assert 1 - part.keep_ratio == pytest.approx(fixture["init_thres_epoch1"][name], abs=0)
    with torch.no_grad():
        for name, update in _official_updates(adapted).items():
            assert _rel(update, fixture["update_epoch1"][name]) < 1e-5, name


def test_official_update_gradients_equal_the_reference() -> None:
    adapted, fixture = _official_vit()
    parts = _official_parts(adapted)
    for name, part in parts.items():
        part.keep_ratio = 1 - fixture["init_thres_epoch1"][name]
    updates = _official_updates(adapted)
    loss = sum((fixture["upstream"][n].double() * u).sum() for n, u in updates.items())
    loss.backward()
    for name, part in parts.items():
        theirs = fixture["backward"][name]
        assert _rel(part.A.grad, torch.cat(list(theirs["In_Qs"]), dim=1)) < 1e-5, name
        assert _rel(part.B.grad, torch.cat(list(theirs["Out_Qs"]), dim=1)) < 1e-5, name
        for scalar in ("alpha", "gamma", "beta"):
            assert _rel(getattr(part, scalar).grad, theirs[scalar][0]) < 1e-5, (name, scalar)


def test_fused_qkv_is_another_update_of_the_same_factors() -> None:
    """One kernel over q, k, v: the softmax runs over all 48 outputs, one budget."""
    adapted, fixture = _official_vit()
    split = _layers(adapted.model)["blocks.0.attn.qkv"]
    fused = SnellaLinear(nn.Linear(16, 48).double(), SnellaArgs(r=8, qkv="fused"))
    with torch.no_grad():
        fused.snella_parts[0].A.copy_(split.snella_parts[0].A)  # the q kernel's A for all
        fused.snella_parts[0].B.copy_(torch.cat([p.B for p in split.snella_parts]))
        fused.snella_parts[0].alpha.fill_(1.0)
        for part in split.snella_parts:
            part.A.copy_(split.snella_parts[0].A)
            part.alpha.fill_(1.0), part.gamma.fill_(1.0), part.beta.fill_(0.0)
        assert _rel(fused.delta_weight(), split.delta_weight()) > 1e-2
        # without the softmax term the two kernels agree entry by entry
        assert torch.allclose(
            torch.cat(
                [
                    p.matrix() - p.alpha * torch.softmax(distance_kernel(p.B, p.A), 0)
                    for p in split.snella_parts
                ]
            ),
            fused.kernel_matrix()
            - torch.softmax(distance_kernel(fused.snella_parts[0].B, fused.snella_parts[0].A), 0),
        )


# ---------------------------------------------------------------- structure


def test_official_update_starts_from_the_kernel() -> None:
    adapted, reference = _adapt("vit_test", {"r": 4})
    layer = _layers(adapted.model)["blocks.0.mlp.fc1"]
    with torch.no_grad():
        kernel = layer.kernel_matrix()
        mask = kernel.abs() > torch.quantile(kernel.abs().flatten(), 1 - 0.99)
        torch.testing.assert_close(layer.delta_weight(), kernel * kernel.abs() * mask)
    assert abs(int(mask.sum()) - 0.99 * kernel.numel()) <= 1
    x, _ = _batch(3)
    adapted.model.eval(), reference.eval()
    with torch.no_grad():
        assert not torch.allclose(adapted.model(x), reference(x), atol=1e-4)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_scaled_update_starts_as_the_base_model(backbone: str) -> None:
    adapted, reference = _adapt(backbone, {"r": 4, "update": "scaled"})
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


def _qkv_rows(model: nn.Module, name: str, qkv: str) -> list[int]:
    """Rows of each kernel of a target linear of the base model."""
    linear = model.get_submodule(name)
    if qkv == "fused" or not name.endswith("qkv"):
        return [linear.out_features]
    attn = model.get_submodule(name.rpartition(".")[0])
    if hasattr(attn, "key_dim"):  # TinyViT
        return [attn.num_heads * d for d in (attn.key_dim, attn.key_dim, attn.val_dim)]
    return [linear.out_features // 3] * 3


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
@pytest.mark.parametrize(
    ("kernel", "update", "qkv"),
    [
        ("mixed", "official", "split"),
        ("distance", "official", "split"),
        ("mixed", "scaled", "fused"),
    ],
)
def test_trains_factors_and_head_only(backbone: str, kernel: str, update: str, qkv: str) -> None:
    r = 4
    args = {"r": r, "kernel": kernel, "update": update, "qkv": qkv}
    adapted, reference = _adapt(backbone, args)
    model, head = adapted.model, classifier_name(reference)
    targets = [
        n
        for n, m in reference.named_modules()
        if isinstance(m, nn.Linear) and re.fullmatch(BLOCK_LINEARS, n)
    ]
    assert len(targets) == len(_layers(model)) == 16
    head_numel = sum(p.numel() for n, p in reference.named_parameters() if n.startswith(head + "."))
    # per kernel: A (in x r) + B (rows x r) (+ alpha, gamma, beta: "mixed"); per layer a
    # scale ("scaled")
    scalars = 3 if kernel == "mixed" else 0
    closed_form = head_numel + (update == "scaled") * len(targets)
    for name in targets:
        n_in = reference.get_submodule(name).in_features
        closed_form += sum(r * (n_in + rows) + scalars for rows in _qkv_rows(reference, name, qkv))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == closed_form
    assert all(".snella_" in n or n.startswith(head + ".") for n in trainable)
    assert not any("patch_embed" in n for n in trainable)
    if update == "scaled":
        _set_scales(model, 0.5)
    x, y = _batch(4)
    F.cross_entropy(model(x), y).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)
    # every factor learns, but q and k of an attention over one token (TinyViT's last
    # stage at 32 px: a 1 x 1 grid, where softmax is 1 whatever q and k are)
    one_token = re.compile(r"stages\.3\..*qkv\.snella_parts\.[01]\.")
    factors = {n: p for n, p in trainable.items() if n.endswith((".A", ".B"))}
    silent = {n for n, p in factors.items() if not p.grad.abs().sum() > 0}
    assert silent == {n for n in factors if qkv == "split" and one_token.match(n)}


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_split_qkv_kernels_cover_the_q_k_v_rows(backbone: str) -> None:
    adapted, _ = _adapt(backbone, {"r": 4})
    name, layer = next((n, m) for n, m in _layers(adapted.model).items() if n.endswith("qkv"))
    parts = layer.snella_parts
    assert len(parts) == 3
    with torch.no_grad():
        merged = layer.kernel_matrix()
        q = parts[0].matrix()
        if backbone == "tiny_vit_test":  # per head [q | k | v]: q is rows 0..15 and 48..63
            attn = adapted.model.get_submodule(name.rpartition(".")[0])
            per = 2 * attn.key_dim + attn.val_dim
            rows = [h * per + i for h in range(attn.num_heads) for i in range(attn.key_dim)]
        else:
            rows = list(range(merged.shape[0] // 3))
        torch.testing.assert_close(merged[rows], q)
        # each kernel's softmax runs over its own rows only
        soft = torch.softmax(distance_kernel(parts[0].B, parts[0].A), dim=0)
        assert torch.allclose(soft.sum(dim=0), torch.ones(q.shape[1]))


def test_adapter_alone_lowers_the_loss() -> None:
    adapted, _ = _adapt("vit_test", {"r": 4}, total_steps=8)
    model = adapted.model
    for name, param in model.named_parameters():  # head frozen: only the adapter learns
        if name.startswith("head."):
            param.requires_grad_(False)
    optimizer = _optimizer(model)
    model.train()
    losses = [_step(adapted, optimizer, step) for step in range(1, 9)]
    assert losses[-1] < losses[0] - 0.02


@pytest.mark.parametrize("r", [2, 4, 8])
def test_kernel_merges_to_a_matrix_of_rank_above_r(r: int) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, r, generator=gen), torch.randn(96, r, generator=gen)
    assert torch.linalg.matrix_rank(b @ a.T) == r  # LoRA's linear kernel: rank r at most
    assert torch.linalg.matrix_rank(distance_kernel(b, a)) == 64  # full rank
    layer = SnellaLinear(nn.Linear(64, 96), SnellaArgs(r=r, qkv="fused"))
    with torch.no_grad():
        layer.snella_parts[0].A.copy_(a), layer.snella_parts[0].B.copy_(b)
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


def test_allocate_caps_layers_and_meets_the_budget_up_to_truncation() -> None:
    assert allocate([3.0, 1.0], [10, 100], 40) == [10, 30]  # excess of a full layer moves on
    assert allocate([0.0, 0.0], [100, 300], 200) == [100, 100]  # no scores: equal shares
    assert allocate([0.0, 0.0], [100, 300], 200, "size") == [50, 150]  # or by size
    assert allocate([0.0, 0.0], [50, 300], 200) == [50, 150]  # a full layer's excess moves
    assert allocate([1.0, 0.0], [10, 10], 15) == [10, 5]  # unscored layers take the rest
    counts = allocate([0.3, 0.2, 0.5], [7, 11, 13], 17)
    assert 17 - 3 < sum(counts) <= 17
    assert all(c <= s for c, s in zip(counts, [7, 11, 13], strict=True))
    assert allocate([1.0], [10], 50) == [10]


def test_epoch_schedule_moves_the_budget_at_epoch_starts_only() -> None:
    args = {"r": 4, "initial_keep": 0.9, "final_keep": 0.3}
    adapted, _ = _adapt("vit_test", args, total_steps=9, steps_per_epoch=3)
    allocator = _allocator(adapted)
    assert [allocator.point(s) for s in range(1, 10)] == [
        None, None, (1, 3), None, None, (2, 3), None, None, None
    ]  # fmt: skip
    optimizer = _optimizer(adapted.model)
    totals = []
    for step in range(1, 7):
        _step(adapted, optimizer, step)
        parts = allocator.parts.values()
        totals.append(sum(p.keep_ratio * p.size for p in parts) / sum(allocator.sizes))
    assert totals[:2] == pytest.approx([0.9, 0.9], abs=1e-12)
    assert totals[2] == totals[3] == totals[4] == pytest.approx(0.3 + 0.6 * (2 / 3) ** 3, abs=1e-3)
    assert totals[5] == pytest.approx(0.3 + 0.6 * (1 / 3) ** 3, abs=1e-3)


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_measured_sparsity_follows_the_allocation_and_the_budget(backbone: str) -> None:
    total = 6
    args = {"r": 4, "initial_keep": 0.9, "final_keep": 0.3, "schedule": "step"}
    adapted, _ = _adapt(backbone, args, total_steps=total)
    model, allocator = adapted.model, _allocator(adapted)
    optimizer = _optimizer(model)
    for step in range(1, 4):
        _step(adapted, optimizer, step)
    layers = _layers(model)
    with torch.no_grad():
        nonzero = {n: int((layer.delta_weight() != 0).sum()) for n, layer in layers.items()}
    for name, layer in layers.items():
        assert abs(nonzero[name] - _kept(layer)) <= len(layer.snella_parts), name
    ratios = allocator.allocation()
    assert len(ratios) == len(layers) + 2 * 4  # each qkv is three kernels
    entries = sum(layer.weight.numel() for layer in layers.values())
    budget = keep_schedule(3, total, SnellaArgs(**args))  # 0.3 + 0.6 / 8
    assert budget == pytest.approx(0.375)
    assert abs(sum(nonzero.values()) - budget * entries) <= 2 * len(ratios)
    # layers compete: after importance is measured, keep ratios differ between layers
    assert len({round(r, 3) for r in ratios.values()}) > 1


def test_a_more_important_layer_gets_a_larger_allocation() -> None:
    args = {"r": 4, "initial_keep": 0.5, "final_keep": 0.1, "schedule": "step"}
    adapted, _ = _adapt("vit_test", args, total_steps=10)
    allocator = _allocator(adapted)
    boosted = "blocks.2.mlp.fc1"
    for name, part in allocator.parts.items():  # even sensitivities, one layer 10x more
        for param in (part.A, part.B):
            param.grad = torch.full_like(param, 1e-3) / param.detach().abs().clamp_min(1e-6)
            if name == boosted:
                param.grad *= 10
    adapted.on_optimizer_step(4)
    ratios = allocator.allocation()
    assert ratios[boosted] > max(r for n, r in ratios.items() if n != boosted)
    same_shape = [n for n in ratios if n.endswith("mlp.fc1") and n != boosted]
    assert all(ratios[boosted] > 2 * ratios[n] for n in same_shape)


@pytest.mark.parametrize(
    ("dataset", "final_keep"), [("cifar100", 0.2), ("dtd", 0.07), ("digits", 0.2)]
)
def test_final_keep_follows_the_dataset_unless_set(dataset: str, final_keep: float) -> None:
    assert final_keep_for(SnellaArgs(), dataset) == final_keep
    assert final_keep_for(SnellaArgs(final_keep=0.5), dataset) == 0.5
    assert final_keep_for(SnellaArgs(initial_keep=0.1), dataset) == min(0.1, final_keep)
    adapted, _ = _adapt("vit_test", {"r": 4}, dataset=dataset)
    assert _allocator(adapted).config.final_keep == final_keep


def test_without_steps_per_epoch_the_epoch_schedule_moves_every_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="workers.methods.snella"):
        adapted, _ = _adapt("vit_test", {"r": 4}, total_steps=10)
    assert "steps per epoch unknown" in caplog.text
    assert _allocator(adapted).point(3) == (3, 10)


# ---------------------------------------------------------------- memory and composition


@pytest.mark.parametrize("args", [{"r": 4}, {"r": 4, **OURS}])
def test_optimizer_state_holds_factors_and_head_only(args: dict) -> None:
    adapted, reference = _adapt("vit_test", args)
    model = adapted.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    if args.get("update") == "scaled":
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
        ({"update": "dense"}, "update must be one of official, scaled, got 'dense'"),
        ({"schedule": "batch"}, "schedule must be one of epoch, step"),
        ({"qkv": "merged"}, "qkv must be one of split, fused"),
        ({"zero_scores": "none"}, "zero_scores must be one of equal, size"),
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


def test_defaults_are_the_reference_codes() -> None:
    resolved = METHODS.resolve_args("snella", {})
    assert resolved["r"] == 32 and resolved["kernel"] == "mixed"
    assert (resolved["initial_keep"], resolved["final_keep"]) == (0.99, None)
    official = ("official", "epoch", "split", "equal")
    assert tuple(resolved[k] for k in ("update", "schedule", "qkv", "zero_scores")) == official
    assert METHODS.resolve_args("snella", {"kernel": "linear", "r": 3})["r"] == 3
    assert not math.isnan(keep_schedule(1, 2, SnellaArgs()))  # None final keep: CIFAR's


def test_a_trial_tells_the_method_its_dataset_and_epochs(
    monkeypatch: pytest.MonkeyPatch, synthetic_data: ImageData
) -> None:
    seen: list[MethodContext] = []

    def spy(name: str, args: dict, model: nn.Module, ctx: MethodContext) -> Adapted:
        seen.append(ctx)
        return apply_method(name, args, model, ctx)

    monkeypatch.setattr(trial_module, "apply_method", spy)
    train = TrainConfig(epochs=2, batch_size=16, lr=1e-3)
    spec = TrialSpec(
        backbone="vit_test",
        method="snella",
        method_args={"r": 4},
        dataset="synthetic",
        dataset_args=SYNTH,
        train=train,
    )
    record = run_trial(spec, num_threads=1, data=synthetic_data)
    assert record.status == "ok", record.error
    (ctx,) = seen
    assert ctx.dataset == "synthetic" and ctx.steps_per_epoch > 1
    assert ctx.total_steps == 2 * ctx.steps_per_epoch == record.steps
