"""Quantiles as ``torch.quantile`` computes them, also above its input-size limit."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_TORCH_LIMIT = 1 << 24  # torch.quantile refuses larger inputs


def quantile(values: torch.Tensor, q: float, dim: int | None = None) -> torch.Tensor:
    """``torch.quantile(values, q, dim)``: linear interpolation between the two order
    statistics around rank q (n - 1); ``dim`` None: over all elements. Above torch's
    size limit the same rank and interpolation through ``kthvalue``.

    Example:
        >>> quantile(torch.tensor([0.0, 1.0, 2.0, 3.0]), 0.5)
        tensor(1.5000)
    """
    if dim is None:
        values, dim = values.flatten(), 0
    if values.numel() <= _TORCH_LIMIT:
        return torch.quantile(values, q, dim=dim)
    rank = torch.tensor(q, dtype=values.dtype) * (values.shape[dim] - 1)
    below, above = int(rank.floor()), int(rank.ceil())
    low = values.kthvalue(below + 1, dim=dim).values
    high = values.kthvalue(above + 1, dim=dim).values
    return torch.lerp(low, high, rank - below)
