"""Every forward-only phase fits its batch to the trial's budget and records it: the pure
fit, the retry on an over-budget stop, and real tiny trials (fine-tuning with its
inference-cost and deployment phases; a DINOv2 baseline's feature extraction)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.spec import TrainConfig, TrialSpec
from workers import deploy as deploy_module
from workers import memory
from workers.backbones import create_backbone
from workers.baselines import tiny
from workers.batch_fit import fit_batch, with_halving
from workers.cost import measure_inference
from workers.deploy import DeployConfig, deploy
from workers.trial import run_trial

MIB = 2**20


def test_the_batch_is_halved_to_the_first_that_fits_and_refused_below_the_floor() -> None:
    fit = fit_batch(
        per_image_bytes=MIB, resident_bytes=10 * MIB, budget_bytes=50 * MIB,
        requested=256, floor=1, phase="inference",
    )  # fmt: skip
    assert (fit.batch_size, fit.predicted_bytes) == (32, 42 * MIB)  # 256 .. 64 do not fit
    with pytest.raises(memory.OverBudget, match="deployment at batch 8") as info:
        fit_batch(
            per_image_bytes=MIB, resident_bytes=10 * MIB, budget_bytes=12 * MIB,
            requested=256, floor=8, phase="deployment",
        )  # fmt: skip
    assert info.value.phase == "deployment"


def test_an_over_budget_stop_halves_and_runs_again_down_to_the_floor() -> None:
    tried: list[int] = []

    def run(batch: int) -> str:
        tried.append(batch)
        if batch > 20:  # what the prediction missed: the guard stops the phase
            raise memory.OverBudget(batch, 20, phase="inference")
        return f"ran {batch}"

    assert with_halving(run, 64, 1, "inference", torch.device("cpu")) == ("ran 16", 16)
    assert tried == [64, 32, 16]
    with pytest.raises(memory.OverBudget):
        with_halving(run, 64, 40, "inference", torch.device("cpu"))  # 32 is below the floor


def _finetune(budget_mb: float) -> TrialSpec:
    # 24 training images: a training batch of 24, while the inference and deployment
    # phases measure batches of the trial's batch size (256 random images)
    data = {"num_classes": 4, "images_per_class": 8, "image_size": 32}
    train = TrainConfig(epochs=1, batch_size=256, max_steps=1, eval_batch_size=256)
    return TrialSpec(
        backbone="mobilenetv2_test", dataset="synthetic", dataset_args=data,
        budget_mb=budget_mb, train=train, deploy={"variants": ["float"]},
    )  # fmt: skip


def test_inference_and_deployment_batches_shrink_to_the_budget_in_a_real_trial(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(deploy_module, "REPEATS", 1)  # the batch, not the timing, is tested
    monkeypatch.setattr(deploy_module, "WARMUP", 0)
    budget = 20.0
    # at the trial's batch size one inference forward alone is over the budget
    model = create_backbone("mobilenetv2_test", num_classes=4)
    unfitted = measure_inference(model, 32, 256, torch.device("cpu"), repeats=1, warmup=0)
    assert unfitted.peak_mem_mb_batch > budget

    record = run_trial(_finetune(budget), num_threads=1)
    assert record.status == "ok", record.error
    assert record.accounted_peak_mb <= budget  # training fits as it is
    assert 1 < record.inference_batch_size_used < 256
    assert record.infer_peak_mem_mb_batch <= budget
    assert record.deploy_batch_size_used is not None and 1 < record.deploy_batch_size_used < 256
    assert record.deploy_peak_mem_mb_batch <= budget
    assert record.eval_batch_size_used < 256
    # the shipped variant's figures were measured at the recorded batch
    assert f'"batch_size": {record.deploy_batch_size_used}' in record.deploy_results


def test_a_deployment_that_does_not_fit_at_batch_one_keeps_the_trained_model() -> None:
    model = create_backbone("mobilenetv2_test", num_classes=4)
    x = torch.randn(4, 3, 32, 32)
    out = deploy(
        model, DeployConfig(variants=("float", "int8")), backbone="mobilenetv2_test", size=32,
        batch_size=64, device=torch.device("cpu"), calibration=[x],
        evaluate=lambda m: 0.5, budget_bytes=MIB // 4,
    )  # fmt: skip
    assert out.batch_size is None
    for result in out.variants.values():
        assert result.skipped.startswith("failed: ") and "deployment at batch 1" in result.skipped
        assert result.peak_mem_mb_batch is None


def _dinov2(folder: Path, budget_mb: float) -> TrialSpec:
    return TrialSpec(
        kind="baseline", backbone=f"local-dir:{folder}", method="", dataset="synthetic",
        dataset_args={"num_classes": 4, "images_per_class": 24, "image_size": 16},
        baseline="dinov2_knn", baseline_args={"image_size": 0}, budget_mb=budget_mb,
        train=TrainConfig(eval_batch_size=128),
    )  # fmt: skip


def test_a_baselines_feature_extraction_batch_shrinks_to_the_budget(tmp_path: Path) -> None:
    folder = tiny.write_dinov2(tmp_path / "dino")
    roomy = run_trial(_dinov2(folder, 4096))
    tight = run_trial(_dinov2(folder, 1.0))
    assert roomy.status == tight.status == "ok", (roomy.error, tight.error)
    assert roomy.baseline_batch_size_used == 128
    assert 8 <= tight.baseline_batch_size_used < 128
    assert tight.accuracy == pytest.approx(roomy.accuracy)  # the same features, in smaller batches
    refused = run_trial(_dinov2(folder, 0.2))
    assert refused.status == "over_budget"
    assert "feature extraction at batch 8" in refused.error
