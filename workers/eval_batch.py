"""The evaluation batch size that fits the trial's budget.

A grid's ``eval_batch_size`` (256 by default) was run as given: at 224 px a MobileNetV2
forward of 256 images holds GBs of activations, far above a training step's accounted
peak, so a trial whose training fits could be killed (CPU) or end ``oom`` (CUDA) in its
evaluation. Here the requested size is halved until the predicted peak fits: the
peak of one forward is measured at a small probe batch (live tensor storages on CPU,
the allocator on CUDA) and scaled by images, since activations grow with the batch.
Below ``EVAL_BATCH_FLOOR`` the trial is ``over_budget`` naming evaluation.

Example:
    >>> fit = fit_eval_batch(model, x, budget_bytes=2 << 30, requested=256)  # doctest: +SKIP
    >>> fit.batch_size, fit.predicted_bytes
    (64, 1893725184)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workers.cost import forward_peak_bytes
from workers.memory import MB, OverBudget

log = logging.getLogger(__name__)

# Fewer images per forward than this is too slow to be worth it: the trial does not fit.
EVAL_BATCH_FLOOR = 8


@dataclass(frozen=True)
class EvalBatch:
    """The chosen evaluation batch and what it is predicted to hold."""

    batch_size: int
    predicted_bytes: int  # resident bytes + one forward at batch_size (scaled from the probe)


def fit_eval_batch(
    model: nn.Module,
    x: torch.Tensor,
    *,
    resident_bytes: int,
    budget_bytes: int,
    requested: int,
    autocast: Any,
    floor: int | None = None,
) -> EvalBatch:
    """Halve ``requested`` until ``resident_bytes`` + one forward fits ``budget_bytes``.

    ``x`` is an input batch already on the model's device (its first ``probe`` images
    are used); ``resident_bytes`` is what stays allocated during evaluation (weights,
    optimizer state, data kept on the device). Raises OverBudget naming evaluation when
    not even the floor fits.
    """
    floor = min(EVAL_BATCH_FLOOR if floor is None else floor, requested)
    probe = x[: min(floor, len(x))]
    per_image = _forward_bytes(model, probe, autocast) / len(probe)
    batch = requested
    while resident_bytes + batch * per_image > budget_bytes and batch > floor:
        batch = max(floor, batch // 2)
    predicted = int(resident_bytes + batch * per_image)
    if predicted > budget_bytes:
        raise OverBudget(
            predicted / MB, budget_bytes / MB, f"evaluation at batch {batch}:", "evaluation"
        )
    if batch < requested:
        log.info("evaluation batch %d -> %d to fit %.0f MiB", requested, batch, budget_bytes / MB)
    return EvalBatch(batch, predicted)


@torch.no_grad()
def _forward_bytes(model: nn.Module, x: torch.Tensor, autocast: Any) -> int:
    """Input + peak bytes one eval-mode forward of ``x`` allocates."""
    training = model.training
    model.eval()
    try:
        with autocast:
            return forward_peak_bytes(lambda: model(x), x, x.device)
    finally:
        model.train(training)
