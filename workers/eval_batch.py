"""The evaluation batch size that fits the trial's budget.

A grid's ``eval_batch_size`` (256 by default) was run as given: at 224 px a MobileNetV2
forward of 256 images holds GBs of activations, far above a training step's accounted
peak, so a trial whose training fits could be killed (CPU) or end ``oom`` (CUDA) in its
evaluation. Here the requested size is halved until the predicted peak fits: the
peak of one forward is measured at a small probe batch (live tensor storages on CPU,
the allocator on CUDA) and scaled by images, since activations grow with the batch
(``workers.batch_fit``). Below ``EVAL_BATCH_FLOOR`` the trial is ``over_budget`` naming
evaluation. The inference-cost and deployment phases fit their batches the same way.

Example:
    >>> fit = fit_eval_batch(model, x, budget_bytes=2 << 30, requested=256)  # doctest: +SKIP
    >>> fit.batch_size, fit.predicted_bytes
    (64, 1893725184)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from workers.batch_fit import FittedBatch, fit_batch
from workers.cost import forward_peak_bytes

log = logging.getLogger(__name__)

# Fewer images per forward than this is too slow to be worth it: the trial does not fit.
EVAL_BATCH_FLOOR = 8


# The chosen evaluation batch and what it is predicted to hold.
EvalBatch = FittedBatch


def fit_eval_batch(
    model: nn.Module,
    x: torch.Tensor,
    *,
    resident_bytes: int,
    budget_bytes: int,
    requested: int,
    autocast: Any,
    floor: int | None = None,
    phase: str = "evaluation",
) -> FittedBatch:
    """Halve ``requested`` until ``resident_bytes`` + one forward fits ``budget_bytes``.

    ``x`` is an input batch already on the model's device (its first ``probe`` images
    are used); ``resident_bytes`` is what stays allocated during the phase (weights,
    optimizer state, data kept on the device). Raises OverBudget naming ``phase`` when
    not even the floor fits.
    """
    floor = min(EVAL_BATCH_FLOOR if floor is None else floor, requested)
    return fit_batch(
        per_image_bytes=per_image_bytes(model, x[: max(1, min(floor, len(x)))], autocast),
        resident_bytes=resident_bytes,
        budget_bytes=budget_bytes,
        requested=requested,
        floor=floor,
        phase=phase,
    )


def per_image_bytes(model: nn.Module, probe: torch.Tensor, autocast: Any) -> float:
    """Bytes one eval-mode forward allocates per image (input included), from ``probe``."""
    return _forward_bytes(model, probe, autocast) / len(probe)


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
