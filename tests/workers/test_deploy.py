"""Deployment phase: merged equals unmerged for every mergeable method, variants measured and
exported (files that load back), the trial's deploy columns, the spec field, the grid's
deploy section."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from orchestrator.expansion import expand
from orchestrator.grid import GridError, parse_grid
from orchestrator.records import SCHEMA_VERSION, RecordStore, TrialRecord, schema_fields
from orchestrator.spec import TrainConfig, TrialSpec
from workers import deploy as deploy_module
from workers import memory
from workers.backbones import classifier_name, create_backbone
from workers.cost import _adapter_layers, _four_bit_layers, inference_model
from workers.data import ImageData
from workers.deploy import DeployConfig, deploy, not_applicable
from workers.memory import MB
from workers.methods import MethodContext, apply_method
from workers.quantization import quantize_model
from workers.trial import run_trial

CPU = torch.device("cpu")

# ---------------------------------------------------------------- merge


def adapted(method: str, args: dict, backbone: str = "vit_test") -> tuple[nn.Module, nn.Module]:
    """(base, adapted) from the same seed; the adapted one's updates made non-zero (a trained
    look: adapters start as a no-op)."""
    torch.manual_seed(0)
    base = create_backbone(backbone, num_classes=4)
    model = apply_method(
        method,
        args,
        copy.deepcopy(base),
        MethodContext(classifier=classifier_name(base), total_steps=10),
    ).model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("lora_B", "lora_E", "snella_scale")) or (
                method == "bitfit" and name.endswith(".bias")
            ):
                param.normal_(0.0, 0.05)
            elif ".snella_parts." in name and name.endswith(".beta"):
                param.fill_(0.3)  # the official update starts small: K * |K|, K ~ 0.01
    return base, model


MERGEABLE = [
    pytest.param("lora", {"r": 4}, True, id="lora"),
    pytest.param("adalora", {"init_r": 4, "target_r": 2}, True, id="adalora"),
    pytest.param("qlora", {"r": 4, "compute_dtype": "fp32"}, True, id="qlora-fp32"),
    pytest.param("qlora", {"r": 4, "compute_dtype": "bf16"}, True, id="qlora-bf16"),
    pytest.param("snella", {"r": 4}, True, id="snella"),
    pytest.param("snella", {"r": 4, "update": "scaled", "qkv": "fused"}, True, id="snella-scaled"),
    pytest.param("bitfit", {}, None, id="bitfit"),  # nothing to merge
]


@pytest.mark.parametrize(("method", "args", "merged"), MERGEABLE)
def test_merged_model_computes_what_the_unmerged_adapted_model_does(
    method: str, args: dict, merged: bool | None
) -> None:
    base, model = adapted(method, args)
    clone, was_merged = inference_model(model, 32, CPU, dequantize=True)
    assert was_merged is merged
    assert _adapter_layers(clone) == [] and _four_bit_layers(clone) == []
    assert {n for n, m in clone.named_modules() if isinstance(m, nn.Linear)} == {
        n for n, m in base.named_modules() if isinstance(m, nn.Linear)
    }
    assert set(clone.state_dict()) == set(base.state_dict())  # the backbone's own names
    for layer in _four_bit_layers(model):  # the merge is exact against fp32 compute
        layer.compute_dtype = torch.float32
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        expected, out, before = model(x), clone(x), base.eval()(x)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert not torch.allclose(out, before, atol=1e-3)  # the adapters did change the function


def test_qlora_merges_only_dequantized() -> None:
    """peft's own 4-bit merge re-quantizes the sum, which changes the outputs: the trial's
    inference cost keeps such a model unmerged; deployment dequantizes first."""
    _, model = adapted("qlora", {"r": 4, "compute_dtype": "fp32"})
    assert inference_model(model, 32, CPU)[1] is False
    assert inference_model(model, 32, CPU, dequantize=True)[1] is True


# ---------------------------------------------------------------- deploy()


def calibration_batches(n: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(8, 3, 32, 32, generator=gen) for _ in range(n)]


def run_deploy(model: nn.Module, artifacts: str | None, **config: Any) -> Any:
    return deploy(
        model,
        DeployConfig(**config),
        backbone="vit_test",
        size=32,
        batch_size=8,
        device=CPU,
        calibration=calibration_batches(),
        evaluate=lambda m: 0.5,
        artifacts_dir=artifacts,
        metadata={"trial_id": "abc"},
    )


def test_exported_variants_load_back_and_reproduce_their_models(tmp_path: Path) -> None:
    _, model = adapted("lora", {"r": 4})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folder = tmp_path / "artifacts"
    out = run_deploy(model, str(folder), variants=["int8", "w8a8"])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # untouched
    files = {p.name for p in folder.iterdir()}
    assert files == {"float.safetensors", "int8.safetensors", "w8a8.safetensors"}
    assert out.artifacts == str(folder) and out.merged is True
    results = out.variants
    for name, result in results.items():
        path = folder / f"{name}.safetensors"
        assert result.file == str(path) and not result.skipped
        assert result.size_mb == path.stat().st_size / MB
        assert result.simulated is (name != "float")
        with safetensors.safe_open(str(path), "pt") as f:
            header = f.metadata()
        assert header["variant"] == name and header["trial_id"] == "abc"
        assert header["merged"] == "True"

    merged, _ = inference_model(model, 32, CPU, dequantize=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model.eval()
    fresh = create_backbone("vit_test", num_classes=4)
    safetensors.torch.load_model(fresh, folder / "float.safetensors")  # strict, own names
    rebuilt = {
        "int8": quantize_model(create_backbone("vit_test", num_classes=4), "int8", None),
        "w8a8": quantize_model(create_backbone("vit_test", num_classes=4), "w8a8", None),
    }
    for name, structure in rebuilt.items():
        safetensors.torch.load_model(structure, folder / f"{name}.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x), atol=1e-5, rtol=1e-5)
        for name, structure in rebuilt.items():
            calibration = calibration_batches() if name == "w8a8" else None
            same = quantize_model(copy.deepcopy(merged), name, calibration)
            torch.testing.assert_close(structure.eval()(x), same.eval()(x), atol=1e-6, rtol=0)

    # int8 storage: codes + scales, about a quarter of fp32 (norms, biases, embeddings stay)
    assert results["int8"].size_mb < 0.35 * results["float"].size_mb
    assert results["w8a8"].size_mb == pytest.approx(results["int8"].size_mb, rel=0.01)
    assert results["int8"].peak_mem_mb_b1 < results["float"].peak_mem_mb_b1
    for result in results.values():
        assert 0 < result.latency_ms_b1 and 0 < result.latency_ms_batch
        assert 0 < result.peak_mem_mb_b1 < result.peak_mem_mb_batch


def test_adapter_export_holds_the_trained_parameters(tmp_path: Path) -> None:
    _, model = adapted("lora", {"r": 4})
    out = run_deploy(model, str(tmp_path), variants=["float"], export="adapter")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]
    with safetensors.safe_open(str(tmp_path / "adapter.safetensors"), "pt") as f:
        names = set(f.keys())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == trained and any("lora_A" in n for n in names)
    assert out.variants["float"].file == "" and out.variants["float"].size_mb > 0


def test_nothing_is_kept_without_export_or_folder(tmp_path: Path) -> None:
    _, model = adapted("bitfit", {})
    out = run_deploy(model, str(tmp_path), variants=["int8"], export="none")
    assert list(tmp_path.iterdir()) == [] and out.artifacts == ""
    assert out.variants["int8"].size_mb > 0  # measured on a temporary file
    assert run_deploy(model, None, variants=["int8"]).variants["int8"].file == ""


def test_files_go_to_a_uri_through_pyarrow(tmp_path: Path) -> None:
    _, model = adapted("bitfit", {})
    uri = f"file://{tmp_path}/bucket/artifacts/t1"
    out = run_deploy(model, uri, variants=["int8"])
    assert out.variants["int8"].file == f"{uri}/int8.safetensors"
    assert (tmp_path / "bucket/artifacts/t1/int8.safetensors").stat().st_size > 0


def test_quamba2_is_skipped_on_a_transformer_and_a_failing_variant_is_a_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, model = adapted("bitfit", {})
    real = deploy_module.quantize_model

    def quantize(model: nn.Module, recipe: str, *args: Any, **kwargs: Any) -> nn.Module:
        if recipe == "w8a8":
            raise RuntimeError("no kernel for this")
        return real(model, recipe, *args, **kwargs)

    monkeypatch.setattr(deploy_module, "quantize_model", quantize)
    out = run_deploy(model, None, variants=["int8", "w8a8", "quamba2"], ship="int8")
    skipped = {name: r.skipped for name, r in out.variants.items()}
    assert skipped["quamba2"] == (
        "quamba2 applies to Mamba backbones only; vit_test is of the transformer family"
    )
    assert skipped["w8a8"] == "failed: RuntimeError: no kernel for this"
    assert skipped["float"] == skipped["int8"] == ""
    assert out.variants["w8a8"].accuracy is None and out.shipped.accuracy == 0.5
    assert json.loads(out.to_json())["quamba2"]["skipped"] == skipped["quamba2"]


def test_a_calibration_stopped_over_budget_is_halved_and_built_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The trial's memory guard checks before every block's forward (``RssGuard.watch``);
    here it stops any calibration forward of more than 2 images: the batches of 8 are
    split until one fits, and the variant is what a calibration in batches of 2 gives."""
    _, model = adapted("lora", {"r": 4})
    real = deploy_module.quantize_model
    seen: list[int] = []

    def guarded(model: nn.Module, recipe: str, calibration: Any, **kwargs: Any) -> nn.Module:
        def check(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen.append(len(args[0]))
            if len(args[0]) > 2:
                raise memory.OverBudget(90.0, 64.0, "process memory growth in deployment:")

        handles = [b.register_forward_pre_hook(check) for b in model.blocks]
        built = real(model, recipe, calibration, **kwargs)
        for handle in handles:
            handle.remove()
        return built

    monkeypatch.setattr(deploy_module, "quantize_model", guarded)
    out = run_deploy(model, str(tmp_path), variants=["int8", "w8a8"], ship="w8a8")
    assert out.shipped.skipped == "" and out.shipped.accuracy == 0.5
    assert out.shipped.peak_mem_mb_batch is not None
    assert seen[0] == 8 and seen[1] == 4 and max(seen[2:]) == 2  # 8, then 4, then 2: it fits
    assert "w8a8 calibrated in batches of 2 to fit the budget" in caplog.text
    results = json.loads(out.to_json())
    assert results["w8a8"]["calibration_batch_size"] == 2
    assert results["int8"]["calibration_batch_size"] is None  # weight-only: no calibration
    assert results["int8"]["skipped"] == ""

    reference, _ = inference_model(model, 32, CPU, dequantize=True)
    halves = [part for xb in calibration_batches() for part in xb.split(2)]
    direct = quantize_model(copy.deepcopy(reference), "w8a8", halves)
    exported = safetensors.torch.load_file(tmp_path / "w8a8.safetensors")
    expected = direct.state_dict()
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


# ---------------------------------------------------------------- the trial


DEPLOY_COLUMNS = [
    "deploy_accuracy",
    "deploy_latency_ms_b1",
    "deploy_latency_ms_batch",
    "deploy_peak_mem_mb_b1",
    "deploy_peak_mem_mb_batch",
    "deploy_size_mb",
    "deploy_simulated",
]


def deploy_spec(backbone: str, method: str, **config: Any) -> TrialSpec:
    return TrialSpec(
        backbone=backbone,
        method=method,
        method_args={"r": 4} if method == "lora" else {},
        dataset="synthetic",
        dataset_args={"num_classes": 4, "images_per_class": 24, "image_size": 16},
        train=TrainConfig(epochs=1, batch_size=16, lr=1e-3, max_steps=3),
        deploy=DeployConfig(calibration_batches=2, **config).to_dict(),
    )


@pytest.mark.parametrize(
    ("backbone", "method", "ship", "merged"),
    [("vit_test", "lora", "w8a8", True), ("vim_test", "bitfit", "quamba2", None)],
)
def test_a_trial_with_a_deploy_section_fills_every_deploy_column(
    backbone: str,
    method: str,
    ship: str,
    merged: bool | None,
    synthetic_data: ImageData,
    tmp_path: Path,
) -> None:
    spec = deploy_spec(backbone, method, variants=["int8", "w8a8", "quamba2"], ship=ship)
    folder = tmp_path / "artifacts" / spec.trial_id
    rec = run_trial(spec, num_threads=2, data=synthetic_data, artifacts_dir=str(folder))
    assert rec.status == "ok", rec.error
    assert all(getattr(rec, c) is not None for c in DEPLOY_COLUMNS)
    assert (rec.deploy_variant, rec.deploy_merged, rec.deploy_simulated) == (ship, merged, True)
    assert 0.0 <= rec.deploy_accuracy <= 1.0 and rec.deploy_artifacts == str(folder)
    results = json.loads(rec.deploy_results)
    assert list(results) == ["float", "int8", "w8a8", "quamba2"]
    shipped = results[ship]
    assert shipped["accuracy"] == rec.deploy_accuracy and shipped["size_mb"] == rec.deploy_size_mb
    assert shipped["latency_ms_b1"] == rec.deploy_latency_ms_b1
    # the float variant is the trained function (merged), evaluated the same way
    assert results["float"]["accuracy"] == pytest.approx(rec.accuracy)
    assert results["float"]["simulated"] is False
    measured = [v for v, r in results.items() if not r["skipped"]]
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{v}.safetensors" for v in measured)
    for name in measured:
        assert results[name]["size_mb"] == (folder / f"{name}.safetensors").stat().st_size / MB
    if backbone == "vit_test":
        assert measured == ["float", "int8", "w8a8"]
        assert "Mamba backbones only" in results["quamba2"]["skipped"]
    else:
        assert measured == list(results)
    assert rec.deploy_size_mb < 0.5 * results["float"]["size_mb"]
    # the columns survive the record store
    store = RecordStore(tmp_path / "out")
    store.write(rec)
    back = store.read_record(rec.trial_id)
    assert back.spec == spec and back.spec.deploy["ship"] == ship
    assert [getattr(back, c) for c in DEPLOY_COLUMNS] == [getattr(rec, c) for c in DEPLOY_COLUMNS]
    assert back.deploy_results == rec.deploy_results


def test_a_trial_without_a_deploy_section_has_empty_deploy_columns(
    synthetic_data: ImageData, tmp_path: Path
) -> None:
    spec = dataclasses.replace(deploy_spec("vit_test", "full"), deploy={})
    rec = run_trial(spec, num_threads=2, data=synthetic_data, artifacts_dir=str(tmp_path))
    assert rec.status == "ok", rec.error
    assert all(getattr(rec, c) is None for c in DEPLOY_COLUMNS)
    assert rec.deploy_results == "" and rec.deploy_variant == "" and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- spec, record, grid


def test_an_empty_deploy_keeps_the_trial_ids_of_earlier_versions() -> None:
    plain = TrialSpec(backbone="vit_test", method="lora", method_args={"r": 4})
    assert plain.trial_id == "dbdb313adbf2"  # its id before the field existed
    assert "deploy" not in json.loads(plain.to_json())
    with_deploy = TrialSpec(
        backbone="vit_test", method="lora", method_args={"r": 4}, deploy=DeployConfig().to_dict()
    )
    assert with_deploy.trial_id != plain.trial_id
    assert TrialSpec.from_json(with_deploy.to_json()) == with_deploy
    assert TrialSpec.from_json(plain.to_json()).deploy == {}


def test_the_schema_has_the_deploy_columns() -> None:
    columns = {name: doc for name, _, doc in schema_fields()}
    assert SCHEMA_VERSION >= 4  # version 4 added them
    for name in [*DEPLOY_COLUMNS, "deploy_variant", "deploy_merged", "deploy_results"]:
        assert name in columns
    assert columns["deploy"].startswith("JSON: resolved deployment phase")
    assert "simulated" in columns["deploy_simulated"]
    row = TrialRecord(spec=deploy_spec("vit_test", "full")).to_row()
    assert json.loads(row["deploy"])["variants"] == ["float", "int8"]


def test_config_is_resolved_in_canonical_order_with_float_as_the_reference() -> None:
    config = DeployConfig(variants=["quamba2", "int8"])
    assert config.variants == ("float", "int8", "quamba2") and config.ship == "quamba2"
    assert DeployConfig(variants="w8a8").to_dict() == {
        "variants": ["float", "w8a8"],
        "ship": "w8a8",
        "calibration_batches": 4,
        "percentile": 99.99,
        "bc_groups": 4,
        "export": "merged",
    }


def with_deploy(grid: dict[str, Any], deploy: Any, backbones: Any = None) -> dict[str, Any]:
    grid = copy.deepcopy(grid) | {"deploy": deploy}
    if backbones is not None:
        grid["backbones"] = backbones
    return grid


def test_grid_deploy_section_reaches_every_finetune_spec(tiny_grid: dict[str, Any]) -> None:
    grid = parse_grid(with_deploy(tiny_grid, {"variants": ["int8"], "export": "none"}))
    assert grid.deploy["variants"] == ["float", "int8"] and grid.deploy["ship"] == "int8"
    specs = expand(grid)
    assert specs and all(s.deploy == grid.deploy for s in specs)
    assert all(s.deploy == {} for s in expand(parse_grid(tiny_grid)))


@pytest.mark.parametrize(
    ("deploy", "where", "message"),
    [
        ({"variants": ["int4"]}, "deploy", "unknown variant 'int4'; valid: float, int8"),
        ({"variants": []}, "deploy", "variants must be a non-empty list"),
        ({"variants": ["int8", "int8"]}, "deploy", "must not repeat"),
        ({"ship": "w8a8"}, "deploy", "ship must be one of the variants ['float', 'int8']"),
        ({"percentile": 120}, "deploy", "percentile must be a number in (50, 100], got 120"),
        ({"calibration_batches": 0}, "deploy", "calibration_batches must be an integer >= 1"),
        ({"export": "zip"}, "deploy", "export must be one of ['merged', 'adapter', 'none']"),
        ({"bits": 4}, "deploy", "unknown field 'bits'"),
        ("int8", "deploy", "must be a mapping"),
        ({"variants": ["quamba2"]}, "deploy.ship", "(vit_test, quamba2) trials would ship"),
    ],
)
def test_bad_deploy_sections_are_refused_naming_the_value(
    tiny_grid: dict[str, Any], deploy: Any, where: str, message: str
) -> None:
    with pytest.raises(GridError) as info:
        parse_grid(with_deploy(tiny_grid, deploy))
    assert info.value.where == where
    assert message in str(info.value)


def test_quamba2_needs_a_mamba_backbone_in_the_grid(tiny_grid: dict[str, Any]) -> None:
    only_vit = with_deploy(tiny_grid, {"variants": ["int8", "quamba2"], "ship": "int8"})
    with pytest.raises(GridError, match="quamba2 applies to none of the backbones") as info:
        parse_grid(only_vit)
    assert info.value.where == "deploy.variants"
    mixed = with_deploy(tiny_grid, only_vit["deploy"], ["vit_test", "vim_test"])
    assert parse_grid(mixed).deploy["variants"] == ["float", "int8", "quamba2"]
    shipped = with_deploy(tiny_grid, {"variants": ["quamba2"]}, ["vim_test", "vit_test"])
    with pytest.raises(GridError, match=r"\(vit_test, quamba2\)"):
        parse_grid(shipped)


def test_quamba_and_w8a8_ssm_are_variants_for_mamba_backbones_only() -> None:
    config = DeployConfig(variants=["quamba2", "w8a8_ssm", "quamba", "int8"])
    assert config.variants == ("float", "int8", "quamba", "w8a8_ssm", "quamba2")
    for variant in ("quamba", "w8a8_ssm", "quamba2"):
        assert not_applicable(variant, "vim_test") == ""
        assert not_applicable(variant, "vit_test") == (
            f"{variant} applies to Mamba backbones only; vit_test is of the transformer family"
        )
