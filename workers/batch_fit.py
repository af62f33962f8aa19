"""The batch size of a forward-only phase that fits the trial's budget.

Every phase that runs the model without training (evaluation, the inference-cost
measurement, the deployment phase, a baseline's feature extraction) holds what stays
resident plus one forward, whose activations grow with the batch. ``fit_batch`` halves
the requested size until resident bytes + batch x (bytes per image) fits the budget,
down to a floor (below it the phase is ``OverBudget``, naming the phase);
``with_halving`` runs a phase and, on an over-budget stop or an out-of-memory error
the prediction missed, halves the batch and runs it again, down to the same floor.

Example:
    >>> fit_batch(per_image_bytes=8 << 20, resident_bytes=1 << 30, budget_bytes=2 << 30,
    ...           requested=256, floor=8, phase="evaluation").batch_size
    128
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from workers.memory import MB, OverBudget

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class FittedBatch:
    """The chosen batch of a phase and what it is predicted to hold."""

    batch_size: int
    predicted_bytes: int  # resident bytes + one forward at batch_size (scaled from a probe)


def fit_batch(
    *,
    per_image_bytes: float,
    resident_bytes: int,
    budget_bytes: int,
    requested: int,
    floor: int,
    phase: str,
) -> FittedBatch:
    """Halve ``requested`` until ``resident_bytes + batch * per_image_bytes`` fits
    ``budget_bytes``; OverBudget naming ``phase`` when not even ``floor`` fits."""
    floor = max(1, min(floor, requested))
    batch = requested
    while resident_bytes + batch * per_image_bytes > budget_bytes and batch > floor:
        batch = max(floor, batch // 2)
    predicted = int(resident_bytes + batch * per_image_bytes)
    if predicted > budget_bytes:
        raise OverBudget(predicted / MB, budget_bytes / MB, f"{phase} at batch {batch}:", phase)
    if batch < requested:
        log.info("%s batch %d -> %d to fit %.0f MiB", phase, requested, batch, budget_bytes / MB)
    return FittedBatch(batch, predicted)


def with_halving(
    run: Callable[[int], T], batch: int, floor: int, phase: str, device: torch.device
) -> tuple[T, int]:
    """``run(batch)``; an over-budget stop or out-of-memory error halves the batch and runs
    again while it stays >= ``floor``, once what the failed try left on ``device`` is
    freed. Returns the result and the batch that produced it."""
    floor = max(1, min(floor, batch))
    while True:
        try:
            return run(batch), batch
        except (OverBudget, torch.OutOfMemoryError):
            if batch // 2 < floor:
                raise
            log.warning("%s over budget at batch %d: halved", phase, batch)
        # out of the except: its traceback no longer holds the failed try's frames
        gc.collect()  # what they held in reference cycles (a model copy's patched blocks)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        batch //= 2
