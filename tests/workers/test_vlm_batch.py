"""The prompted VLM's image batch is fitted to the trial's budget and recorded, as the
other baselines' feature-extraction batches are (``workers.baselines.vlm.fit_image_batch``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.spec import TrainConfig, TrialSpec
from workers.baselines import tiny
from workers.data import load_dataset
from workers.trial import run_trial

DATA = {"num_classes": 4, "images_per_class": 24, "image_size": 16}
QUESTION = "What is in this image?"


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    classes = load_dataset("synthetic", DATA).classes
    return tiny.write_vlm(tmp_path_factory.mktemp("vlm"), "smolvlm", [QUESTION, *classes])


def _spec(model: Path, budget_mb: float) -> TrialSpec:
    return TrialSpec(
        kind="baseline", backbone=f"local-dir:{model}", method="", dataset="synthetic",
        dataset_args=DATA, baseline="vlm_prompt",
        baseline_args={"question": QUESTION, "image_batch": 8, "generation_tokens": 2},
        budget_mb=budget_mb, train=TrainConfig(eval_batch_size=16),
    )  # fmt: skip


def test_the_vlm_image_batch_shrinks_to_the_budget_and_is_recorded(smolvlm: Path) -> None:
    # the tiny model: 0.15 MiB of weights, ~0.4 MiB for a chunk of 64 answers' caches and
    # ~0.04 MiB per image of prefix forward and cache: 8 images fit 64 MiB, not 0.6 MiB
    roomy = run_trial(_spec(smolvlm, 64.0))
    tight = run_trial(_spec(smolvlm, 0.6))
    assert roomy.status == tight.status == "ok", (roomy.error, tight.error)
    assert roomy.baseline_batch_size_used == 8
    assert 1 <= tight.baseline_batch_size_used < 8
    assert tight.batch_mb < roomy.batch_mb  # the largest pixel batch held
    # the same answers, fewer images per forward
    assert tight.accuracy == pytest.approx(roomy.accuracy)
    assert tight.generation_accuracy == pytest.approx(roomy.generation_accuracy)
    refused = run_trial(_spec(smolvlm, 0.3))  # not even the weights and one chunk fit
    assert refused.status == "over_budget"
    assert "prompting at batch 1" in refused.error
