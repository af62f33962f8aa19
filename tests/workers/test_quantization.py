"""Post-training quantization: int8 rounding bounds, calibration, the Hadamard rotation, the
authors' Quamba arithmetic (reference fixture), and the quamba and w8a8_ssm recipes on the
tiny Vim."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.fixtures.official import make_quamba
from workers.backbones import create_backbone, input_size
from workers.data import batches, load_dataset
from workers.mamba.kernels import ScanInputs
from workers.quantization import (
    QMAX,
    QuantConv,
    QuantLinear,
    QuantScanInputs,
    RangeObserver,
    fake_quantize,
    full_hadamard,
    hadamard_block,
    quantize_model,
    quantize_weight,
    rotate,
    scale_of,
    simulation_tensors,
)

# ---------------------------------------------------------------- int8 rounding


def test_int8_weight_error_is_at_most_half_a_scale_per_element() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 40, generator=gen) * torch.logspace(-3, 1, 16)[:, None]
    weight[5] = 0.0  # an all-zero channel still gets a usable scale
    codes, scale = quantize_weight(weight)
    assert codes.dtype == torch.int8 and scale.shape == (16,)
    torch.testing.assert_close(scale[:5], weight[:5].abs().amax(dim=1) / 127)
    assert codes.abs().max() <= QMAX
    assert (codes.abs().amax(dim=1)[torch.arange(16) != 5] == QMAX).all()  # full range used
    error = (codes.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert torch.equal(codes[5], torch.zeros(40, dtype=torch.int8))


def test_activation_rounding_saturates_beyond_the_clipping_range() -> None:
    scale = scale_of(torch.tensor(2.0))
    x = torch.tensor([-5.0, -2.0, -0.01, 0.0, 1.0, 2.0, 3.0])
    y = fake_quantize(x, scale)
    assert y[0] == y[1] == -2.0 and y[-1] == y[-2] == 2.0
    assert ((y - x).abs()[1:-1] <= scale / 2 + 1e-7).all()


@pytest.mark.parametrize("layer", [nn.Linear(24, 10), nn.Conv2d(3, 8, 3, padding=1)])
def test_int8_layers_store_codes_and_scales_and_compute_with_them(layer: nn.Module) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    x = torch.randn(4, 24) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 6, 6)
    expected = model(x)
    quantize_model(model, "int8", calibration=None)
    q = model[0]
    assert isinstance(q, QuantLinear | QuantConv)
    assert set(model.state_dict()) == {"0.qweight", "0.weight_scale", "0.bias"}
    assert model.state_dict()["0.qweight"].dtype == torch.int8
    dequantized = q.qweight.float() * q.weight_scale.view(-1, *([1] * (q.qweight.dim() - 1)))
    assert torch.equal(q.weight, dequantized)
    assert simulation_tensors(model) == [q.weight]
    with torch.no_grad():
        out = model(x)
    assert not torch.equal(out, expected)
    torch.testing.assert_close(out, expected, atol=0.02, rtol=0.02)


def test_a_loaded_state_dict_replaces_the_dequantized_weights() -> None:
    torch.manual_seed(0)
    source = quantize_model(nn.Sequential(nn.Linear(8, 4)), "int8", calibration=None)
    target = quantize_model(nn.Sequential(nn.Linear(8, 4)), "int8", calibration=None)
    assert not torch.equal(source[0].weight, target[0].weight)
    target.load_state_dict(source.state_dict())
    assert torch.equal(source[0].weight, target[0].weight)


# ---------------------------------------------------------------- calibration


def test_w8a8_clips_at_the_largest_input_of_all_calibration_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    calibration = [torch.randn(4, 8) for _ in range(3)]
    calibration[2][1, 3] = 9.0  # the largest |input| is in the last batch
    with torch.no_grad():
        hidden = [model[1](model[0](x)) for x in calibration]
    quantize_model(model, "w8a8", calibration)
    assert model[0].input_scale == pytest.approx(9.0 / 127)
    largest = max(float(h.abs().max()) for h in hidden)
    assert model[2].input_scale == pytest.approx(largest / 127)


def test_w8a8_without_calibration_batches_is_refused() -> None:
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(nn.Sequential(nn.Linear(4, 2)), "w8a8", calibration=[])


def test_percentile_observer_averages_each_batchs_percentile() -> None:
    observer = RangeObserver(percentile=90.0)
    first = torch.arange(1.0, 11.0)  # 90th percentile of |x|: 9
    second = -torch.arange(1.0, 21.0)  # of 20 values: the 18th, 18
    observer.update(first.view(1, -1))
    observer.update(second.view(1, -1))
    assert observer.clip().tolist() == [13.5]
    biggest = RangeObserver()
    biggest.update(first.view(1, -1))
    biggest.update(second.view(1, -1))
    assert biggest.clip().tolist() == [20.0]


# ---------------------------------------------------------------- Hadamard rotation


@pytest.mark.parametrize(("features", "block"), [(64, 64), (96, 32), (384, 128)])
def test_hadamard_rotation_leaves_a_layers_float_output_unchanged(
    features: int, block: int
) -> None:
    torch.manual_seed(0)
    assert hadamard_block(features) == block
    linear = nn.Linear(features, 12)
    x = torch.randn(5, 7, features)
    rotated = F.linear(rotate(x, block), rotate(linear.weight, block), linear.bias)
    torch.testing.assert_close(rotated, linear(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotate(rotate(x, block), block), x, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(rotate(x, block), x)
    # the layer that stores the rotated weight computes the same float function
    layer = QuantLinear(linear, act=False, rotation=block)
    layer.weight.copy_(rotate(linear.weight.detach(), block))  # no rounding of the weight
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)


def outlier_activations() -> torch.Tensor:
    """Tokens of 64 channels, three of which carry values ~40x the others (as the
    channels of Mamba's SSM input and out_proj input do)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    x[:, [3, 17, 40]] *= 40.0
    return x


def test_hadamard_rotation_lowers_int8_error_on_outlier_channels() -> None:
    x = outlier_activations()
    plain = fake_quantize(x, scale_of(x.abs().max())) - x
    r = rotate(x, 64)
    rotated = rotate(fake_quantize(r, scale_of(r.abs().max())), 64) - x  # back, then compare
    assert rotated.norm() < 0.3 * plain.norm()
    # the same at the layer: w8a8 with the rotation fused (quamba2's in_proj / out_proj)
    # vs without, both calibrated on x
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        expected = linear(x)
        plain_layer = quantize_model(nn.Sequential(copy.deepcopy(linear)), "w8a8", [x])
        rotated_layer = QuantLinear(linear, act=True, rotation=64)
        rotated_layer.input_scale.copy_(scale_of(rotate(x, 64).abs().max()))
        plain_error = (plain_layer(x) - expected).norm()
        rotated_error = (rotated_layer(x) - expected).norm()
    assert rotated_error < 0.5 * plain_error


# ---------------------------------------------------------------- Quamba2 on the tiny Vim


@functools.cache
def trained_vim() -> tuple[nn.Module, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """vim_test trained for 24 steps on a learnable synthetic task (4 stripe classes);
    its calibration batches (training split) and the test split."""
    torch.manual_seed(0)
    data = load_dataset("synthetic", {"num_classes": 4, "images_per_class": 48, "image_size": 32})
    model = create_backbone("vim_test", num_classes=4)
    feed = functools.partial(
        batches, size=input_size(model), mean=data.mean, std=data.std, device=torch.device("cpu")
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for xb, yb in feed(data.train_x, data.train_y, 24, generator=gen):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    model.eval()
    calibration = [xb for xb, _ in feed(data.train_x, data.train_y, 24)][:4]
    test_x, test_y = next(iter(feed(data.test_x, data.test_y, len(data.test_y))))
    return model, calibration, test_x, test_y


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_w8a8_ssm_keeps_the_tiny_vims_accuracy_with_per_group_bc_scales() -> None:
    model, calibration, test_x, test_y = trained_vim()
    float_accuracy = accuracy(model, test_x, test_y)
    assert float_accuracy > 0.6  # chance: 0.25
    quantized = quantize_model(copy.deepcopy(model), "w8a8_ssm", calibration, bc_groups=4)
    assert accuracy(quantized, test_x, test_y) >= float_accuracy - 0.05
    naive = quantize_model(copy.deepcopy(model), "w8a8", calibration)
    with torch.no_grad():
        reference = model(test_x)
        gap = (quantized(test_x) - reference).abs().max() / reference.abs().max()
        naive_gap = (naive(test_x) - reference).abs().max() / reference.abs().max()
    assert 0 < gap < 0.1
    assert gap < 0.7 * naive_gap  # the recipe beats plain w8a8 (measured: 0.055 vs 0.135)
    scans = [m for m in quantized.modules() if isinstance(m, QuantScanInputs)]
    assert len(scans) == 2 * 4  # forward and backward branch of each of the 4 blocks
    assert not any(type(m) is ScanInputs for m in quantized.modules())
    for layer in quantized.layers:
        mixer = layer.mixer
        for scan, x_proj in (
            (mixer.scan_inputs, mixer.x_proj),
            (mixer.scan_inputs_b, mixer.x_proj_b),
        ):
            assert scan.b_scale.shape == scan.c_scale.shape == (4,)  # 16 states, 4 groups
            assert scan.u_scale.shape == scan.delta_scale.shape == ()
            assert (scan.b_scale > 0).all() and (scan.c_scale > 0).all()
            # x_proj reads the scan's input u: the same percentile clip, the same scale
            torch.testing.assert_close(x_proj.input_scale, scan.u_scale)
        assert mixer.in_proj.rotation == 32 and mixer.out_proj.rotation == 64
        assert mixer.dt_proj.rotation == 1 and mixer.dt_proj.input_scale is not None
    assert quantized.head.rotation == 1  # rotations only inside the mixers


def test_w8a8_ssm_clips_the_ssm_input_below_its_maximum() -> None:
    model, calibration, _, _ = trained_vim()
    largest: list[float] = []
    hook = model.layers[0].mixer.scan_inputs.register_forward_pre_hook(
        lambda _m, args: largest.append(float(args[0].abs().max()))
    )
    with torch.no_grad():
        for xb in calibration:
            model(xb)
    hook.remove()
    quantized = quantize_model(copy.deepcopy(model), "w8a8_ssm", calibration, percentile=99.0)
    u_clip = float(quantized.layers[0].mixer.scan_inputs.u_scale) * 127
    assert 0 < u_clip < min(largest)


@pytest.mark.parametrize("recipe", ["quamba", "w8a8_ssm", "quamba2"])
def test_mamba_recipes_need_a_mamba_backbone(recipe: str) -> None:
    with pytest.raises(ValueError, match=f"{recipe} needs a Mamba backbone"):
        quantize_model(create_backbone("vit_test", num_classes=3), recipe, [])


def test_quamba2_is_the_former_name_of_w8a8_ssm() -> None:
    model, calibration, test_x, _ = trained_vim()
    old = quantize_model(copy.deepcopy(model), "quamba2", calibration)
    new = quantize_model(copy.deepcopy(model), "w8a8_ssm", calibration)
    assert old.state_dict().keys() == new.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(old(test_x), new(test_x), rtol=0, atol=0)


def test_bc_groups_must_divide_the_states() -> None:
    model, calibration, _, _ = trained_vim()
    with pytest.raises(ValueError, match="bc_groups=3 does not divide the 16 states"):
        quantize_model(copy.deepcopy(model), "w8a8_ssm", calibration[:1], bc_groups=3)


# ---------------------------------------------------------------- quamba: the authors' arithmetic

OFFICIAL = Path(__file__).parents[1] / "fixtures" / "official" / "quamba.pt"


def _official() -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """The fixture and its calibration batches' activations (its float data path)."""
    fixture = torch.load(OFFICIAL, weights_only=True)
    path = [make_quamba._activations(h, fixture["weights"]) for h in fixture["hidden"]]
    return fixture, path


def test_observers_equal_quambas() -> None:
    fixture, path = _official()
    for key, clip in fixture["clip"].items():
        ssm_input = key == "x_proj:input"  # the 99.95th percentile, EMA 0.01
        observer = RangeObserver(99.95, 0.01) if ssm_input else RangeObserver()
        for acts in path:
            observer.update(acts[key].reshape(1, -1))
        torch.testing.assert_close(observer.clip()[0], clip, rtol=1e-6, atol=0, msg=key)
        torch.testing.assert_close(scale_of(observer.clip()[0]), fixture["scales"][key], msg=key)
    assert fixture["clip"]["x_proj:input"] < max(a["x_proj:input"].abs().max() for a in path)


def test_per_tensor_weights_equal_quambas() -> None:
    fixture, _ = _official()
    for name, weight in fixture["weights"].items():
        codes, scale = quantize_weight(weight, per_tensor=True)
        assert torch.equal(codes, fixture[f"{name}:qweight"]), name
        torch.testing.assert_close(scale[0], fixture[f"{name}:weight_scale"], rtol=0, atol=0)


def test_w8a8b8o8_linear_equals_quambas() -> None:
    """x_proj with int8 input and output: the integer product, one scaling, rounding."""
    fixture, path = _official()
    layer = QuantLinear(
        nn.Linear(64, 20, bias=False), act=True, per_tensor=True, output=True
    )  # fmt: skip
    layer.qweight.copy_(fixture["x_proj:qweight"])
    layer.weight_scale.copy_(fixture["x_proj:weight_scale"])
    layer.input_scale.copy_(fixture["scales"]["x_proj:input"])
    layer.output_scale.copy_(fixture["scales"]["x_proj:output"])
    x = path[-1]["x_proj:input"]
    x_codes = torch.clamp(torch.round(x / layer.input_scale), -128, 127)
    assert torch.equal(x_codes.to(torch.int8), fixture["x_proj:x_int8"])
    y_codes = torch.round(layer(x) / layer.output_scale)
    assert torch.equal(y_codes.to(torch.int8), fixture["x_proj:y_int8"])


def test_full_width_hadamard_of_a_power_of_two_equals_the_transforms() -> None:
    fixture, _ = _official()
    x, z = (fixture["hidden"][-1] @ fixture["weights"]["in_proj"].T).chunk(2, dim=-1)
    y = F.silu(x) * F.silu(z)  # out_proj's input before the rotation (the fixture's path)
    torch.testing.assert_close(rotate(y, 64), fixture["out_proj:rotated"])
    assert not torch.allclose(rotate(y, 32), fixture["out_proj:rotated"])  # block-diagonal


@pytest.mark.parametrize("n", [12, 20, 40, 640, 768])
def test_full_width_hadamard_of_12_or_20_times_a_power_of_two_is_orthonormal(n: int) -> None:
    assert full_hadamard(n) and not full_hadamard(7 * 64)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = rotate(x, n)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1))
    entries = (rotate(torch.eye(n, dtype=torch.float64), n) * n**0.5).abs()
    torch.testing.assert_close(entries, torch.ones(n, n, dtype=torch.float64))  # +-1 / sqrt(n)


def test_quamba_recipe_on_the_tiny_vim() -> None:
    model, calibration, test_x, test_y = trained_vim()
    float_accuracy = accuracy(model, test_x, test_y)
    quantized = quantize_model(copy.deepcopy(model), "quamba", calibration)
    assert accuracy(quantized, test_x, test_y) >= float_accuracy - 0.1
    linears = [m for m in quantized.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.per_tensor and m.weight_scale.shape == (1,) for m in linears)
    assert all(m.input_scale is not None for m in linears)
    for layer in quantized.layers:
        mixer = layer.mixer
        for name in ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b"):
            assert getattr(mixer, name).output_scale is not None, name  # int8 outputs
        assert mixer.out_proj.output_scale is None and mixer.out_proj.rotation == 64
        assert mixer.in_proj.rotation == 1  # Quamba (Mamba1) rotates out_proj's input only
        for x_proj, dt_proj, scan in (
            (mixer.x_proj, mixer.dt_proj, mixer.scan_inputs),
            (mixer.x_proj_b, mixer.dt_proj_b, mixer.scan_inputs_b),
        ):
            assert torch.equal(dt_proj.input_scale, x_proj.output_scale)
            assert scan.u_only and scan.b_scale is None
            torch.testing.assert_close(scan.u_scale, x_proj.input_scale)  # the same tensor
    assert quantized.head.output_scale is None and quantized.head.rotation == 1
