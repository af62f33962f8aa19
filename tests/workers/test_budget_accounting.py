"""On the CPU a dataset is host memory for every strategy: adaptive checkpointing does not
pay for it where static and none do not (it would be refused where static fits)."""

from __future__ import annotations

from orchestrator.spec import TrainConfig, TrialSpec
from workers.trial import run_trial

# 4 x 1500 images at 32 px: 18 MiB of dataset, more than the models' accounted peaks
BIG = {"num_classes": 4, "images_per_class": 1500, "image_size": 32}


def _record(strategy: str, budget_mb: float):  # noqa: ANN202
    spec = TrialSpec(
        backbone="vit_test",
        checkpointing=strategy,
        dataset="synthetic",
        dataset_args=BIG,
        train=TrainConfig(epochs=1, batch_size=16, max_steps=2),
        budget_mb=budget_mb,
    )
    return run_trial(spec, num_threads=1)


def test_adaptive_fits_where_static_fits_beside_a_large_dataset() -> None:
    static = _record("static", 2048)
    assert static.status == "ok", static.error
    dataset_mb = 4 * 1500 * 3 * 32 * 32 / 2**20
    assert dataset_mb > 2 * static.accounted_peak_mb  # the dataset would not fit beside it
    adaptive = _record("adaptive", static.accounted_peak_mb + 0.5)
    assert adaptive.status == "ok", adaptive.error
    assert adaptive.accounted_peak_mb <= static.accounted_peak_mb + 0.5
