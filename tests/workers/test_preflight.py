"""A trial that cannot fit is refused before it allocates: the least memory predicted on
the meta device, the process-memory guard on CPU, a decoded dataset larger than RAM."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.spec import TrainConfig, TrialSpec
from workers import memory
from workers.data import load_dataset
from workers.data.images import available_bytes
from workers.preflight import least_memory
from workers.trial import run_trial

QUICK = TrainConfig(epochs=1, batch_size=16, max_steps=2)
SYNTH = {"num_classes": 4, "images_per_class": 8, "image_size": 16}


def _spec(**kw) -> TrialSpec:  # noqa: ANN003
    return TrialSpec(
        **({"backbone": "vit_test", "dataset": "synthetic", "dataset_args": SYNTH} | kw),
        train=QUICK,
    )


def test_the_bound_adds_weights_batch_and_the_largest_activation() -> None:
    small = least_memory(_spec(), num_classes=4)
    # vit_test at 32 px: patch 8 -> 16 tokens + class token, dim 64; batch of 16
    assert small.batch_bytes == 16 * 3 * 32 * 32 * 4
    assert small.weights_bytes > 0
    assert small.activation_bytes >= 16 * 17 * 64 * 4  # at least one block's output
    big = least_memory(_spec(backbone_args={"img_size": 4096}), num_classes=4)
    assert big.batch_bytes == 16 * 3 * 4096 * 4096 * 4
    assert big.activation_bytes > small.activation_bytes * 1000
    assert big.total_bytes == big.weights_bytes + big.batch_bytes + big.activation_bytes


def test_a_giant_input_is_over_budget_without_allocating() -> None:
    """4096 px, the largest size a grid accepts: the batch alone (3 GiB) and the patch
    tokens exceed a 2 GiB budget; nothing of it is allocated."""
    before = memory.rss_bytes()
    record = run_trial(_spec(backbone_args={"img_size": 4096}, budget_mb=2048), num_threads=1)
    grown_mb = (memory.rss_bytes() - before) / 2**20
    assert record.status == "over_budget", record.error
    assert "least memory predicted before allocating" in record.error
    assert record.peak_mem_mb > 2 * 2048  # the prediction: several times the budget
    assert grown_mb < 200  # the ~7 GB it would need were never asked for


def test_the_process_memory_guard_trips_on_growth_past_its_limit() -> None:
    guard = memory.RssGuard(budget_mb=8, margin_mb=8)
    guard.check()  # nothing grew yet
    ballast = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
    with pytest.raises(memory.OverBudget, match=r"process memory growth \(RSS, limit 16 MB\)"):
        guard.check()
    del ballast


def test_a_trial_whose_process_memory_runs_away_is_over_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The guard is consulted during the trial (here its reading grows by 2 GiB after the
    guard's baseline: the wiring, with the reading itself tested above)."""
    readings = iter([0] + [2**31] * 10_000)
    monkeypatch.setattr(memory, "rss_bytes", lambda: next(readings))
    record = run_trial(_spec(budget_mb=64), num_threads=1)
    assert record.status == "over_budget", record.error
    assert "process memory growth" in record.error


def test_a_dataset_larger_than_the_machine_is_refused_before_decoding() -> None:
    available = available_bytes()
    assert available is not None  # Linux: /proc/meminfo
    # digits at 4096 px: 1797 images x 5 bytes per pixel (float copy + uint8) = 140.4 GiB
    assert 1797 * 5 * 4096**2 > available  # more than this machine has
    before = memory.rss_bytes()
    message = "1797 images at 4096 px would take 140.4 GiB decoded, more than the"
    with pytest.raises(ValueError, match=message):
        load_dataset("digits", {"image_size": 4096})
    assert (memory.rss_bytes() - before) / 2**20 < 200
