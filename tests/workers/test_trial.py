"""run_trial: every backbone x method x checkpointing trains; failures become records."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest
import torch

from orchestrator.spec import TrainConfig, TrialSpec
from tests.workers.conftest import applicable_pairs
from workers import trial as trial_module
from workers.checkpointing import Checkpointer
from workers.data import ImageData
from workers.energy import EnergyConfig
from workers.methods import METHODS
from workers.trial import run_trial

QUICK = TrainConfig(epochs=1, batch_size=16, lr=1e-3, max_steps=3)
SYNTH = {"num_classes": 4, "images_per_class": 24, "image_size": 16}


def _spec(**kw) -> TrialSpec:  # noqa: ANN003
    base = dict(
        backbone="vit_test",
        method="full",
        dataset="synthetic",
        dataset_args=SYNTH,
        train=QUICK,
        budget_mb=2048,
    )
    return TrialSpec(**(base | kw))


@pytest.mark.parametrize(("backbone", "method"), applicable_pairs(METHODS.names()))
@pytest.mark.parametrize("checkpointing", ["none", "static", "adaptive"])
def test_every_combination_runs_and_is_measured(
    backbone: str, method: str, checkpointing: str, synthetic_data: ImageData
) -> None:
    spec = _spec(backbone=backbone, method=method, checkpointing=checkpointing)
    rec = run_trial(spec, num_threads=1, data=synthetic_data)
    assert rec.status == "ok", rec.error
    assert rec.steps == 3
    assert 0.0 <= rec.accuracy <= 1.0 and 0.0 <= rec.top5_accuracy <= 1.0
    assert rec.accuracy <= rec.top5_accuracy
    assert 0 < rec.params_trainable <= rec.params_total
    if method == "full":
        assert rec.params_trainable == rec.params_total
    else:  # tiny models: an adapter can be as large as the layer, so only a strict subset
        assert rec.params_trainable < rec.params_total
    assert rec.macs > 0
    assert rec.mem_source == "accounted" and rec.cap_kind == "accounted"
    assert rec.peak_mem_mb == pytest.approx(rec.accounted_peak_mb)
    assert rec.peak_mem_mb == pytest.approx(
        rec.params_mb + rec.grads_mb + rec.optimizer_mb + rec.activations_mb + rec.batch_mb
    )
    assert (rec.checkpointed_blocks > 0) == (checkpointing == "static")
    # no GPU here: CPU package counters where readable, else the labelled estimate
    assert rec.energy_source in ("rapl", "estimated") and rec.energy_j > 0
    assert rec.energy_estimated == (rec.energy_source == "estimated")
    assert rec.energy_avg_w == pytest.approx(rec.energy_j / rec.energy_window_s)
    assert 0 < rec.energy_window_s < rec.train_time_s
    assert 0 < rec.infer_latency_ms_b1 and 0 < rec.infer_latency_ms_batch
    assert rec.infer_peak_mem_mb_b1 < rec.infer_peak_mem_mb_batch
    assert rec.infer_mem_source == "live_tensors"
    adds_adapters = method in ("lora", "adalora", "qlora", "snella")
    assert (rec.infer_merged is None) == (not adds_adapters)
    assert json.loads(rec.versions)["torch"]
    assert rec.started_at <= rec.ended_at


def test_full_finetuning_learns_digits() -> None:
    spec = TrialSpec(
        backbone="tiny_vit_test",
        method="full",
        dataset="digits",
        train=TrainConfig(epochs=2, batch_size=32, lr=5e-3, warmup_epochs=0.5),
    )
    rec = run_trial(spec, num_threads=2)
    assert rec.status == "ok", rec.error
    assert rec.accuracy > 0.6  # chance is 0.1
    assert rec.throughput_img_s > 0 and rec.train_time_s > 0


def test_dataset_options_reach_the_trial(synthetic_data: ImageData) -> None:
    options = {"val_fraction": 0.25, "per_class": 8}
    plain = run_trial(_spec(), data=synthetic_data)
    rec = run_trial(_spec(dataset_args=SYNTH | options), data=synthetic_data)
    assert rec.status == "ok", rec.error
    assert (plain.train_images, rec.train_images) == (len(synthetic_data.train_y), 32)
    assert plain.val_accuracy is None and 0.0 <= rec.val_accuracy <= 1.0
    assert rec.data_source == "memory" and rec.data_wait_s >= 0
    augmented = run_trial(_spec(dataset_args=SYNTH | {"augment": True}), data=synthetic_data)
    again = run_trial(_spec(dataset_args=SYNTH | {"augment": True}), data=synthetic_data)
    assert augmented.train_loss == again.train_loss  # seeded crops
    assert augmented.train_loss != plain.train_loss


def test_trial_loads_and_labels_its_own_data() -> None:
    rec = run_trial(_spec(dataset_args={"images_per_class": 12}))
    assert rec.status == "ok", rec.error
    assert rec.data_source in ("decoded", "process_cache")
    provided = run_trial(
        _spec(), data=lambda: (trial_module.load_source("synthetic", SYNTH)[0], "x")
    )
    assert provided.data_source == "x"


def test_energy_config_reaches_the_meter(synthetic_data: ImageData, tmp_path: Path) -> None:
    zone = tmp_path / "intel-rapl:0"  # a package counter that stands still
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("5000000\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    config = EnergyConfig(meter="rapl", powercap_root=str(tmp_path))
    rec = run_trial(_spec(), data=synthetic_data, energy=config)
    assert rec.status == "ok", rec.error
    assert (rec.energy_source, rec.energy_j, rec.energy_estimated) == ("rapl", 0.0, False)
    assert rec.energy_exclusive is False  # a CPU package is shared unless said otherwise
    missing = EnergyConfig(meter="rapl", powercap_root=str(tmp_path / "none"))
    rec = run_trial(_spec(), data=synthetic_data, energy=missing)
    assert rec.energy_source == "estimated" and "rapl: " in rec.energy_fallback


def test_live_progress_while_training(
    synthetic_data: ImageData, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trial_module, "PROGRESS_INTERVAL_S", 0.0)  # every step
    seen: list[dict[str, float]] = []
    spec = _spec(train=TrainConfig(epochs=1, batch_size=16, max_steps=5))
    rec = run_trial(spec, data=synthetic_data, progress=seen.append)
    assert rec.status == "ok", rec.error
    steps = [p["step"] for p in seen]
    assert steps[:-1] == [1, 2, 3, 4, 5] and steps[-1] == 5  # and once more at the end
    energy = [p["energy_j"] for p in seen]
    assert energy == sorted(energy) and energy[-1] <= rec.energy_j
    assert all(p["peak_mem_mb"] == pytest.approx(rec.accounted_peak_mb) for p in seen)
    assert all(p["loss"] > 0 for p in seen)
    wall = dt.datetime.fromisoformat(rec.ended_at) - dt.datetime.fromisoformat(rec.started_at)
    assert rec.data_wait_s < rec.first_step_s < wall.total_seconds()


def test_per_epoch_validation_for_a_pruner(synthetic_data: ImageData) -> None:
    seen: list[dict[str, float]] = []
    spec = _spec(
        dataset_args=SYNTH | {"val_fraction": 0.25},
        train=TrainConfig(epochs=3, batch_size=16),
    )
    rec = run_trial(spec, data=synthetic_data, progress=seen.append, epoch_validation=True)
    assert rec.status == "ok", rec.error
    epochs = [p for p in seen if "epoch" in p]
    assert [p["epoch"] for p in epochs] == [1, 2, 3]
    # after the last epoch the model is the trained one: its validation accuracy
    assert epochs[-1]["val_accuracy"] == rec.val_accuracy
    unasked: list[dict[str, float]] = []
    plain = run_trial(spec, data=synthetic_data, progress=unasked.append)
    assert plain.status == "ok" and unasked and all("epoch" not in p for p in unasked)


def test_bf16_trial_gets_bf16_batches(synthetic_data: ImageData) -> None:
    fp32 = run_trial(_spec(), data=synthetic_data)
    bf16 = run_trial(
        _spec(train=TrainConfig(epochs=1, batch_size=16, max_steps=3, precision="bf16")),
        data=synthetic_data,
    )
    assert fp32.status == bf16.status == "ok", bf16.error
    assert bf16.batch_mb == pytest.approx(fp32.batch_mb / 2)  # 2 bytes a value, not 4
    assert 0.0 <= bf16.accuracy <= 1.0


def test_epoch_validation_is_not_training_time(
    synthetic_data: ImageData, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trial_module._evaluate

    def slow_evaluate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(trial_module, "_evaluate", slow_evaluate)
    spec = _spec(dataset_args=SYNTH | {"val_fraction": 0.25}, train=TrainConfig(epochs=3))
    plain = run_trial(spec, data=synthetic_data, progress=lambda _: None)
    pruned = run_trial(spec, data=synthetic_data, progress=lambda _: None, epoch_validation=True)
    assert plain.status == pruned.status == "ok"
    # three validations of >= 1 s each would add >= 3 s: they are taken out (the margin,
    # half of that, is for two runs of the same trial timing apart on a loaded machine)
    assert pruned.train_time_s < plain.train_time_s + 1.5
    assert pruned.energy_window_s < plain.energy_window_s + 1.5


def test_a_failed_measurement_keeps_the_trained_trial(
    synthetic_data: ImageData, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("the inference copy computes another function")

    monkeypatch.setattr(trial_module, "inference_cost", broken)
    rec = run_trial(_spec(), data=synthetic_data)
    assert rec.status == "ok" and 0.0 <= rec.accuracy <= 1.0
    assert rec.infer_latency_ms_b1 is None and rec.infer_merged is None


def test_same_spec_same_result(synthetic_data: ImageData) -> None:
    a = run_trial(_spec(method="lora", seed=3), data=synthetic_data)
    b = run_trial(_spec(method="lora", seed=3), data=synthetic_data)
    c = run_trial(_spec(method="lora", seed=4), data=synthetic_data)
    assert (a.train_loss, a.loss) == (b.train_loss, b.loss)
    assert a.train_loss != c.train_loss


def test_checkpointing_changes_memory_not_numbers(synthetic_data: ImageData) -> None:
    plain = run_trial(_spec(checkpointing="none"), data=synthetic_data)
    ckpt = run_trial(_spec(checkpointing="static"), data=synthetic_data)
    assert plain.train_loss == pytest.approx(ckpt.train_loss, rel=1e-5)
    assert plain.loss == pytest.approx(ckpt.loss, rel=1e-5)
    assert ckpt.activations_mb < plain.activations_mb


def test_over_budget_is_a_record_not_a_crash(synthetic_data: ImageData) -> None:
    rec = run_trial(_spec(budget_mb=0.5), data=synthetic_data)
    assert rec.status == "over_budget"
    assert rec.peak_mem_mb > 0.5
    assert "exceeds the budget of 0.5 MB" in rec.error
    assert rec.accuracy is None
    # the same worker goes on to run a trial that fits
    assert run_trial(_spec(), data=synthetic_data).status == "ok"


def test_exception_becomes_a_failed_record(synthetic_data: ImageData) -> None:
    rec = run_trial(
        _spec(train=TrainConfig(epochs=1, precision="fp16", max_steps=2)), data=synthetic_data
    )
    assert rec.status == "failed"
    assert "fp16 needs a CUDA device" in rec.error and "Traceback" in rec.error
    assert rec.ended_at


def test_missing_cuda_is_a_failed_record(
    synthetic_data: ImageData, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    rec = run_trial(_spec(train=TrainConfig(device="cuda", max_steps=1)), data=synthetic_data)
    assert rec.status == "failed" and "no CUDA device is visible" in rec.error


def test_baseline_without_a_model_fails_cleanly(synthetic_data: ImageData) -> None:
    rec = run_trial(
        TrialSpec(kind="baseline", baseline="dinov2_knn", dataset="synthetic"), data=synthetic_data
    )
    assert rec.status == "failed" and "needs a model" in rec.error


# ---------------------------------------------------------------- adaptive checkpointing


def test_adaptive_plan_is_in_the_record_and_predicts_the_peak(synthetic_data: ImageData) -> None:
    plain = run_trial(_spec(), data=synthetic_data)
    budget = plain.accounted_peak_mb - 0.5 * plain.activations_mb  # half the activations
    rec = run_trial(_spec(checkpointing="adaptive", budget_mb=budget), data=synthetic_data)
    assert rec.status == "ok", rec.error
    plan = json.loads(rec.ckpt_plan)
    assert list(plan) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert set(plan.values()) - {"save"}  # something is recomputed
    assert rec.checkpointed_blocks == sum(m != "save" for m in plan.values())
    assert rec.accounted_peak_mb <= budget
    assert rec.ckpt_predicted_peak_mb == pytest.approx(rec.accounted_peak_mb, rel=0.01)
    assert rec.ckpt_recompute_ms > 0 and rec.ckpt_replans == 0
    assert rec.train_loss == pytest.approx(plain.train_loss, rel=1e-5)  # same numbers


def test_adaptive_below_the_least_feasible_budget_is_over_budget(
    synthetic_data: ImageData,
) -> None:
    rec = run_trial(_spec(checkpointing="adaptive", budget_mb=0.5), data=synthetic_data)
    assert rec.status == "over_budget"
    assert rec.peak_mem_mb > 0.5  # the least the cheapest plan needs
    assert "exceeds the budget of 0.5 MB" in rec.error


def test_injected_oom_is_recovered_by_replanning(
    synthetic_data: ImageData, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = run_trial(_spec(), data=synthetic_data)
    calls = {"n": 0}
    real = trial_module.F.cross_entropy

    def flaky(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 2:  # the first training step (the first call profiles)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(trial_module.F, "cross_entropy", flaky)
    budget = plain.accounted_peak_mb + 0.1  # everything fits: the plan saves every block
    rec = run_trial(_spec(checkpointing="adaptive", budget_mb=budget), data=synthetic_data)
    assert calls["n"] > 2
    assert rec.status == "ok", rec.error
    assert rec.ckpt_replans == 1
    assert set(json.loads(rec.ckpt_plan).values()) - {"save"}  # the tighter plan recomputes
    assert rec.steps == 3


def test_oom_without_an_adaptive_plan_is_an_oom_record(
    synthetic_data: ImageData, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(trial_module.F, "cross_entropy", oom)
    rec = run_trial(_spec(checkpointing="static"), data=synthetic_data)
    assert rec.status == "oom" and "out of memory" in rec.error


def test_measured_peak_over_budget_replans_on_cpu(
    synthetic_data: ImageData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first step measures more than the plan predicted: re-plan, check again."""
    plain = run_trial(_spec(), data=synthetic_data)
    real = Checkpointer.activation_peak
    calls = {"n": 0}

    def first_step_heavier(self, meter):  # noqa: ANN001, ANN202
        calls["n"] += 1
        return real(self, meter) + (3 * 1024 * 1024 if calls["n"] == 1 else 0)

    monkeypatch.setattr(Checkpointer, "activation_peak", first_step_heavier)
    rec = run_trial(
        _spec(checkpointing="adaptive", budget_mb=plain.accounted_peak_mb + 0.1),
        data=synthetic_data,
    )
    assert rec.status == "ok", rec.error
    assert rec.ckpt_replans == 1 and calls["n"] >= 2
    assert rec.accounted_peak_mb <= plain.accounted_peak_mb + 0.1  # the checked step fits
