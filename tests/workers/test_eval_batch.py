"""The evaluation batch fits the budget, and every phase's memory is in the record:
the fit on a hand-checked module, real tiny trials through run_trial, the guard's phases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from orchestrator.spec import TrainConfig, TrialSpec
from workers import eval_batch, memory, trial
from workers.eval_batch import fit_eval_batch
from workers.trial import run_trial

MIB = 2**20


def _spec(budget_mb: float, eval_batch_size: int = 256) -> TrialSpec:
    train = TrainConfig(epochs=1, batch_size=8, max_steps=2, eval_batch_size=eval_batch_size)
    return TrialSpec(
        backbone="mobilenetv2_test", dataset="digits", budget_mb=budget_mb, train=train
    )


def test_the_batch_is_halved_until_one_forward_fits() -> None:
    model = nn.Linear(1000, 4000)  # one forward: input 4 kB + output 16 kB per image
    x = torch.randn(8, 1000)
    resident = 16 * MIB
    per_image = 4000 + 16000
    fit = fit_eval_batch(
        model, x, resident_bytes=resident, budget_bytes=resident + 100 * per_image,
        requested=256, autocast=torch.no_grad(),
    )  # fmt: skip
    assert fit.batch_size == 64  # 256 -> 128 -> 64: the first at most 100 images
    assert fit.predicted_bytes == resident + 64 * per_image
    roomy = fit_eval_batch(
        model, x, resident_bytes=resident, budget_bytes=1 << 40, requested=256,
        autocast=torch.no_grad(),
    )  # fmt: skip
    assert roomy.batch_size == 256


def test_below_the_floor_is_over_budget_in_evaluation() -> None:
    model = nn.Linear(1000, 4000)
    with pytest.raises(memory.OverBudget, match="evaluation at batch 8") as info:
        fit_eval_batch(
            model, torch.randn(8, 1000), resident_bytes=MIB, budget_bytes=MIB + 1000,
            requested=256, autocast=torch.no_grad(),
        )  # fmt: skip
    assert info.value.phase == "evaluation"


def test_a_trial_whose_evaluation_would_not_fit_is_shrunk_and_ok() -> None:
    roomy = run_trial(_spec(budget_mb=4096), num_threads=1)
    tight = run_trial(_spec(budget_mb=12), num_threads=1)
    assert roomy.status == "ok", roomy.error
    assert tight.status == "ok", tight.error
    assert roomy.eval_batch_size_used == 256
    # before the fit the evaluation peak was the largest: above the training step's
    assert roomy.eval_peak_mem_mb > 12 > roomy.peak_mem_mb
    assert tight.eval_batch_size_used < 256
    assert tight.eval_peak_mem_mb <= 12
    assert tight.peak_mem_mb == pytest.approx(roomy.peak_mem_mb)  # the training peak
    assert tight.accuracy == pytest.approx(roomy.accuracy)  # the same model, other batches


def test_an_evaluation_that_cannot_fit_at_the_floor_is_over_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(trial._Evaluator, "_floor", lambda self: 128)
    record = run_trial(_spec(budget_mb=12), num_threads=1)
    assert record.status == "over_budget"
    assert record.error.startswith("evaluation at batch 128")
    assert record.peak_mem_mb == record.accounted_peak_mb  # still the training peak
    assert record.steps == 2


def test_an_over_budget_stop_in_evaluation_halves_the_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = trial._evaluate
    tried: list[int] = []

    def guarded(model, x, y, classes, feed, batch_size, autocast):  # noqa: ANN001, ANN202
        tried.append(batch_size)
        if batch_size > 32:  # as the RSS guard would stop it
            raise memory.OverBudget(1e4, 1.0, "process memory growth", "evaluation")
        return real(model, x, y, classes, feed, batch_size, autocast)

    monkeypatch.setattr(trial, "_evaluate", guarded)
    record = run_trial(_spec(budget_mb=4096), num_threads=1)
    assert record.status == "ok", record.error
    assert tried[:3] == [256, 128, 64]
    assert record.eval_batch_size_used == 32


def test_the_floor_is_never_above_the_training_batch() -> None:
    # a forward at the training batch fits wherever the training step did: the evaluation
    # may go down to the training batch instead of stopping the trial at the usual floor
    def floor(batch_size: int, eval_batch_size: int) -> int:
        evaluator = trial._Evaluator.__new__(trial._Evaluator)
        train = TrainConfig(batch_size=batch_size, eval_batch_size=eval_batch_size)
        evaluator.spec = TrialSpec(backbone="mobilenetv2_test", dataset="digits", train=train)
        return evaluator._floor()

    assert eval_batch.EVAL_BATCH_FLOOR == 8
    assert floor(2, 64) == 2
    assert floor(32, 64) == 8
    assert floor(32, 4) == 4


def test_every_phase_has_a_resident_peak_within_the_limit() -> None:
    record = run_trial(_spec(budget_mb=64), num_threads=1)
    assert record.status == "ok", record.error
    assert record.rss_limit_mb == 64 + memory.RSS_MARGIN_MB + memory.RSS_MARGIN_SHARE * 64
    for peak in (record.train_rss_peak_mb, record.eval_rss_peak_mb, record.infer_rss_peak_mb):
        assert peak is not None and peak <= record.rss_limit_mb
    assert record.deploy_rss_peak_mb is None  # the spec asks for no deployment


def test_the_guard_reports_each_phase_and_names_it_when_it_stops() -> None:
    guard = memory.RssGuard(budget_mb=8, margin_mb=8)
    guard.begin("evaluation")
    ballast = np.ones(64 * MIB, dtype=np.uint8)  # 64 MiB, touched
    with pytest.raises(memory.OverBudget, match=r"limit 16 MB\) in evaluation") as info:
        guard.check()
    assert info.value.phase == "evaluation"
    del ballast
    guard.begin("inference")
    assert guard.peaks_mb["evaluation"] >= 60
    assert guard.peaks_mb["inference"] < guard.peaks_mb["evaluation"]


def test_the_high_water_mark_catches_a_peak_between_samples() -> None:
    if not memory.reset_rss_high_water_mark():
        pytest.skip("this kernel refuses to reset the peak RSS (/proc/self/clear_refs)")
    guard = memory.RssGuard(budget_mb=1024)
    guard.begin("deployment")
    np.ones(64 * MIB, dtype=np.uint8).sum()  # allocated and freed, never sampled
    guard.end()
    assert guard.peaks_mb["deployment"] >= 60
