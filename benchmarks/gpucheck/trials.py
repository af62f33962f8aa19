"""Trials the parts run through ``run_trial``, as a sweep would: TrialSpecs of the check's
sizes, its synthetic dataset, and each step's training loss.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from benchmarks.gpucheck.sizes import METHOD_ARGS, Sizes
from orchestrator.records import TrialRecord
from orchestrator.spec import TrainConfig, TrialSpec
from workers import trial as trial_module
from workers.checkpointing import PLAN_MODES, count_modes
from workers.data import ImageData, load_dataset
from workers.trial import run_trial


def spec(
    sizes: Sizes,
    device: str,
    *,
    backbone: str,
    method: str,
    batch: int,
    steps: int,
    budget_mb: float,
    checkpointing: str = "none",
    checkpointing_args: dict[str, Any] | None = None,
    seed: int = 0,
    lr: float = 1e-3,
) -> TrialSpec:
    """A fine-tuning trial on the check's synthetic data: ``steps`` optimizer steps."""
    return TrialSpec(
        backbone=backbone,
        backbone_args={"img_size": sizes.img_size} if sizes.img_size else {},
        method=method,
        method_args=METHOD_ARGS.get(method, {}),
        checkpointing=checkpointing,
        checkpointing_args=checkpointing_args or {},
        dataset="synthetic",
        dataset_args=sizes.dataset,
        budget_mb=budget_mb,
        seed=seed,
        train=TrainConfig(
            epochs=10_000,  # max_steps ends the trial
            max_steps=steps,
            batch_size=batch,
            eval_batch_size=batch,
            lr=lr,
            precision=sizes.precision,
            device=device,
        ),
    )


def dataset(sizes: Sizes) -> ImageData:
    return load_dataset("synthetic", sizes.dataset)


def run_with_losses(
    spec: TrialSpec, data: ImageData, threads: int
) -> tuple[TrialRecord, list[float]]:
    """``run_trial(spec)`` and the training loss of every step, in order: the trial's own
    progress sink, asked for a report after every step instead of every 2 s."""
    losses: dict[int, float] = {}

    def sink(figures: dict[str, float]) -> None:
        if "loss" in figures:
            losses[int(figures["step"])] = float(figures["loss"])

    with _progress_every_step():
        record = run_trial(spec, num_threads=threads, data=data, progress=sink)
    return record, [losses[s] for s in sorted(losses)]


@contextlib.contextmanager
def _progress_every_step() -> Iterator[None]:
    before = trial_module.PROGRESS_INTERVAL_S
    trial_module.PROGRESS_INTERVAL_S = 0.0
    try:
        yield
    finally:
        trial_module.PROGRESS_INTERVAL_S = before


PLAN_LABEL = "/".join(PLAN_MODES)  # what plan_counts counts, in its order


def plan_counts(record: TrialRecord) -> str:
    """The checkpointing plan of a record as block counts per mode (``PLAN_LABEL``)."""
    return count_modes(json.loads(record.ckpt_plan or "{}").values())


def first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")
