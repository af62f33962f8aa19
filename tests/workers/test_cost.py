"""Compute cost: MACs against timm's published figures, inference latency and memory,
and the merged inference copy (which must leave the trained model as it was)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.backbones import classifier_name, create_backbone, input_size
from workers.checkpointing import Checkpointer
from workers.cost import (
    InferenceCost,
    forward_macs,
    inference_cost,
    inference_model,
    macs_by_operator,
)
from workers.memory import MB
from workers.methods import MethodContext, apply_method

CPU = torch.device("cpu")

# timm's benchmark tables (fvcore counts; results/benchmark-infer-amp-nchw-pt240-cu124-
# rtx4090.csv): the model as its benchmark built it (TinyViT: the default tag's 21,841-
# class head, hence 12.08M parameters), param_count (M), infer_gmacs, and infer_gmacs of
# the PyTorch 2.1 tables (pt210-cu121-rtx3090), whose trace missed the fused attention.
PUBLISHED_GMACS = [
    ("vit_small_patch16_224", 1000, 22.05, 4.61, 4.25),
    ("tiny_vit_5m_224", 21841, 12.08, 1.28, 1.18),
]


def _macs(name: str, num_classes: int, size: int = 224) -> tuple[int, dict[str, int]]:
    """(parameters, MACs by operator) of a registered backbone, built on CPU."""
    model = create_backbone(name, num_classes=num_classes).eval()
    x = torch.zeros(1, 3, size, size)
    return sum(p.numel() for p in model.parameters()), macs_by_operator(lambda: model(x))


def _attention(by_op: dict[str, int], name: str) -> int:
    """The attention matmuls: fused (SDPA), or TinyViT's q @ k and attn @ v (its bmm)."""
    fused = sum(v for op, v in by_op.items() if "attention" in op)
    return fused + (by_op.get("aten.bmm", 0) if name.startswith("tiny_vit") else 0)


@pytest.mark.parametrize(("name", "classes", "params_m", "gmacs", "no_attn"), PUBLISHED_GMACS)
def test_macs_match_timm_published_gmacs(
    name: str, classes: int, params_m: float, gmacs: float, no_attn: float
) -> None:
    params, by_op = _macs(name, classes)
    macs = sum(by_op.values())
    assert round(params / 1e6, 2) == params_m
    assert macs / 1e9 == pytest.approx(gmacs, rel=0.005)
    assert (macs - _attention(by_op, name)) / 1e9 == pytest.approx(no_attn, rel=0.005)
    # the norms are counted as fvcore does: 5 per element of an affine LayerNorm
    assert by_op["aten.native_layer_norm"] % 5 == 0
    assert forward_macs(create_backbone(name, num_classes=classes), 224, CPU) == macs


@pytest.mark.parametrize(
    ("name", "params_m", "gmacs"),
    [("mobilenetv2_100", 3.5, 0.31), ("mobilenetv3_large_100", 5.48, 0.23)],
)
def test_mobilenet_macs_match_timm_published_gmacs(
    name: str, params_m: float, gmacs: float
) -> None:
    params, by_op = _macs(name, 1000)
    assert (round(params / 1e6, 2), round(sum(by_op.values()) / 1e9, 2)) == (params_m, gmacs)
    assert by_op["aten.native_batch_norm"] > 0 and by_op["adaptive_avg_pool"] > 0


def test_mambavision_t_against_its_papers_figures() -> None:
    """NVlabs/MambaVision's README: 31.8M parameters, 4.4 "FLOPs(G)" (MACs, by ptflops
    in mambavision/throughput_measure.py). We count 4.58 G: its matmuls and convolutions
    alone are 4.46 G (+1.4%), attention 0.10 G, norms and pool 0.01 G; which operators
    that ptflops run counted is not recorded, so the bound is loose."""
    params, by_op = _macs("mambavision_t", 1000)
    macs = sum(by_op.values())
    assert round(params / 1e6, 1) == 31.8
    assert macs / 1e9 == pytest.approx(4.4, rel=0.05)
    matmul_conv = sum(
        v
        for op, v in by_op.items()
        if op in ("aten.mm", "aten.addmm", "aten.bmm", "aten.convolution")
    )
    assert matmul_conv / 1e9 == pytest.approx(4.4, rel=0.015)


@pytest.mark.slow  # our scan on CPU: minutes for one 224 px image
def test_vim_small_against_its_papers_figures() -> None:
    """hustvl/Vim's README gives 26M parameters and no FLOPs: the MACs are checked
    against Vim-S's layer arithmetic (24 bidirectional Mamba layers, d 384, inner 768,
    state 16, dt rank 24, conv 4, 197 tokens with the middle class token)."""
    params, by_op = _macs("vim_small", 1000)
    assert round(params / 1e6) == 26
    tokens, d, inner, state, rank, conv = 197, 384, 768, 16, 24, 4
    per_direction = (
        tokens * inner * (rank + 2 * state)  # x_proj
        + tokens * rank * inner  # dt_proj
        + (tokens + conv - 1) * inner * conv  # causal depthwise conv1d (padded)
        + tokens * inner * state  # the scan's C . h (our scan's matmul)
    )
    layer = tokens * d * 2 * inner + tokens * inner * d + 2 * per_direction
    patches = 196 * d * 3 * 16 * 16
    assert sum(by_op.values()) == 24 * layer + patches + d * 1000


def test_macs_of_a_linear_layer_are_exact() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    assert forward_macs(model, 4, CPU) == 3 * 4 * 4 * 10


def test_macs_restore_every_module_mode() -> None:
    model = create_backbone("vit_test", num_classes=4)
    model.train()
    model.blocks[1].eval()  # a module meant to stay in eval (e.g. frozen statistics)
    before = [m.training for m in model.modules()]
    forward_macs(model, input_size(model), CPU)
    assert [m.training for m in model.modules()] == before


class ClassToken(nn.Module):
    """PiT's pattern: a parameter expanded to batch 1 (a no-op view) passed to a child."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, 4))
        self.proj = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.token.expand(x.shape[0], -1, -1)).flatten(1) + x.mean()


def test_macs_of_a_model_passing_a_parameter_view_to_a_child() -> None:
    model = ClassToken()
    model.proj.bias.requires_grad_(False)  # a frozen parameter stays frozen after
    assert forward_macs(model, 2, CPU) == 4 * 5  # the linear (a mean is not counted)
    assert [p.requires_grad for p in model.parameters()] == [True, True, False]


class Repeat(nn.Module):
    """Known live tensors: y (4 units) and z (4 units) and the output, all alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.repeat(1, 4, 1, 1)
        z = y * self.scale
        return z.sum(dim=(1, 2, 3))


def test_cpu_peak_memory_counts_live_tensors_exactly() -> None:
    cost = inference_cost(Repeat(), 8, 3, CPU, repeats=1, warmup=0)
    unit = 3 * 8 * 8 * 4  # one fp32 image
    weights = 4  # the scale
    for batch, peak in ((1, cost.peak_mem_mb_b1), (3, cost.peak_mem_mb_batch)):
        # weights + input (1 unit) + y and z (8 units) + the output (one float per image)
        assert peak * MB == weights + batch * (9 * unit + 4)
    assert (cost.mem_source, cost.merged) == ("live_tensors", None)


def adapted(method: str, args: dict, checkpointing: str = "none") -> nn.Module:
    """A trained-looking vit_test: method applied, checkpointing installed, weights moved."""
    torch.manual_seed(0)
    model = create_backbone("vit_test", num_classes=4)
    ctx = MethodContext(classifier=classifier_name(model), total_steps=10)
    model = apply_method(method, args, model, ctx).model
    with torch.no_grad():  # adapters start as a no-op: make them change the function
        for name, param in model.named_parameters():
            if "lora_B" in name or "snella_scale" in name:
                param.normal_(0.0, 0.05)
            elif ".snella_parts." in name and name.endswith(".beta"):
                param.fill_(0.3)  # the official update starts small: K * |K|, K ~ 0.01
    Checkpointer(checkpointing, {}, model)
    return model


@pytest.mark.parametrize(
    ("method", "args", "merged"),
    [
        ("full", {}, None),  # no adapter layers: nothing to merge
        ("bitfit", {}, None),
        ("lora", {"r": 4}, True),  # peft merge_and_unload
        ("snella", {"r": 4}, True),  # delta_weight() folded into a Linear
    ],
)
def test_inference_cost_merges_adapters_on_a_copy(
    method: str, args: dict, merged: bool | None
) -> None:
    model = adapted(method, args, checkpointing="static")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    patched = [m for m in model.modules() if "forward" in vars(m)]
    cost = inference_cost(model, input_size(model), 8, CPU, repeats=2, warmup=1)
    assert isinstance(cost, InferenceCost)
    assert cost.merged is merged
    assert cost.latency_ms_b1 > 0 and cost.latency_ms_batch > 0
    assert cost.peak_mem_mb_batch >= cost.peak_mem_mb_b1 > 0
    # the trained model is untouched: weights, checkpointing patches, mode
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [m for m in model.modules() if "forward" in vars(m)] == patched
    assert model.training


def test_merged_copy_computes_the_trained_function_without_adapters() -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = adapted("lora", {"r": 4}, checkpointing="static")
    clone, merged = inference_model(model, input_size(model), CPU)
    assert merged is True
    assert not any(isinstance(m, BaseTunerLayer) for m in clone.modules())
    assert not any("forward" in vars(m) for m in clone.modules())  # runs its own layers
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(clone(x), model(x), atol=1e-5)


def test_adapters_that_cannot_merge_are_measured_unmerged(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    def refuse(self: BaseTuner) -> None:
        raise ValueError("cannot merge this adapter configuration")

    monkeypatch.setattr(BaseTuner, "_check_merge_allowed", refuse)  # peft's own veto
    model = adapted("lora", {"r": 4})
    clone, merged = inference_model(model, input_size(model), CPU)
    assert merged is False
    assert any(isinstance(m, BaseTunerLayer) for m in clone.modules())
    assert inference_cost(model, input_size(model), 4, CPU, repeats=1, warmup=0).merged is False


def test_lora_adds_its_branches_to_the_training_macs() -> None:
    base = forward_macs(adapted("full", {}), 32, CPU)
    lora = forward_macs(adapted("lora", {"r": 4}), 32, CPU)
    # each of the 4 blocks' qkv/proj/fc1/fc2 adds r * (in + out) per token, 17 tokens
    dim, hidden, tokens = 64, 256, 17
    per_block = 4 * ((dim + 3 * dim) + (dim + dim) + (dim + hidden) + (hidden + dim))
    assert lora - base == 4 * per_block * tokens


class FalseDelta(nn.Module):
    """Claims an update (``delta_weight``) that its forward does not add."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 48))
        self.bias = nn.Parameter(torch.zeros(10))

    def delta_weight(self) -> torch.Tensor:
        return torch.ones_like(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def test_a_merge_that_changes_the_outputs_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Flatten(), FalseDelta())
    clone, merged = inference_model(model, 4, CPU)
    assert merged is False
    assert isinstance(clone[1], FalseDelta)
    assert "merging changed the outputs" in caplog.text
