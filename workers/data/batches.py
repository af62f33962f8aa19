"""Training and evaluation batches cut from a whole dataset with tensor ops.

Every step is one batched call on the trial's device: gather, convert, normalise,
resize, or, with augmentation, a seeded random-resized crop and flip drawn for the
whole batch at once (no per-image Python, no PIL in the loop).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.data.core import DataOptions, pair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Augment:
    """A random-resized crop (area share and aspect ratio ranges) and a horizontal flip."""

    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip: bool

    @classmethod
    def of(cls, options: DataOptions) -> Augment | None:
        """The augmentation ``options`` ask for; None when they ask for none."""
        if not options.augment:
            return None
        return cls(
            pair(options.crop_scale, "crop_scale"),
            pair(options.crop_ratio, "crop_ratio"),
            options.flip,
        )


def crop_transforms(n: int, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) affine maps from output to input coordinates, one random crop each.

    The crop's area share is uniform in ``scale`` and its aspect ratio log-uniform in
    ``ratio`` (torchvision's ``RandomResizedCrop``); a crop that would not fit is
    clipped to the image where torchvision redraws it. A flip negates the x scale.
    """
    area = torch.empty(n).uniform_(*augment.scale, generator=generator)
    log_ratio = torch.empty(n).uniform_(*map(math.log, augment.ratio), generator=generator)
    ratio = log_ratio.exp()
    width = (area * ratio).sqrt().clamp_(max=1.0)  # as shares of the image's side
    height = (area / ratio).sqrt().clamp_(max=1.0)
    centre_x = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    centre_y = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    sign = torch.ones(n)
    if augment.flip:
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = width * sign
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    return theta


def resample(
    x: torch.Tensor, theta: torch.Tensor, size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Bilinear samples of ``x`` (B, C, H, W) at ``size`` x ``size`` points mapped by the
    axis-aligned affine maps ``theta`` (B, 2, 3), as ``grid_sample`` with border padding,
    returned as ``dtype``.

    A map without rotation is separable: per image, out = Ry @ x @ Rx^T with two
    interpolation matrices. From a small stored image (CIFAR's 32 px to 224 px) those
    two batched matmuls cost less than ``grid_sample``'s per-pixel grid, and a bf16
    batch (a bf16 trial's) comes from bf16 matmuls directly; from a large one their
    dense inner dimension costs more, and ``grid_sample`` is used.
    """
    height, width = x.shape[-2:]
    if max(height, width) * 2 > size:
        grid = F.affine_grid(theta, [len(x), x.shape[1], size, size], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.to(dtype)
    rows = _interpolation_matrix(theta[:, 1, 1], theta[:, 1, 2], height, size).to(dtype)
    cols = _interpolation_matrix(theta[:, 0, 0], theta[:, 0, 2], width, size).to(dtype)
    return torch.matmul(torch.matmul(rows[:, None], x.to(dtype)), cols.transpose(1, 2)[:, None])


def _interpolation_matrix(
    scale: torch.Tensor, offset: torch.Tensor, n_in: int, n_out: int
) -> torch.Tensor:
    """(B, n_out, n_in) bilinear weights of output pixel centres mapped to the input by
    ``u -> scale * u + offset`` in [-1, 1] coordinates (``align_corners=False``)."""
    u = (2 * torch.arange(n_out, device=scale.device, dtype=scale.dtype) + 1) / n_out - 1
    pos = (((scale[:, None] * u + offset[:, None]) + 1) * n_in - 1) / 2
    pos = pos.clamp(0, n_in - 1)  # border padding
    lo = pos.floor().long().clamp_(max=n_in - 1)
    hi = (lo + 1).clamp_(max=n_in - 1)
    frac = (pos - lo)[..., None]
    weights = torch.zeros(len(scale), n_out, n_in, device=scale.device, dtype=scale.dtype)
    weights.scatter_add_(2, lo[..., None], 1 - frac)
    return weights.scatter_add_(2, hi[..., None], frac)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    device: torch.device,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    augment: Augment | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised ``dtype`` batches at ``size`` px; shuffled when ``generator`` is
    given.

    Every step is one batched tensor op on ``device``: gather, convert, normalise, resize
    (or, with ``augment``, crop + flip + resize in one ``resample`` whose random maps
    are drawn from ``generator``). ``x`` may already live on ``device``. A trial that
    computes in bf16 asks for bf16 batches: autocast would cast them at the first layer.
    """
    if augment is not None and generator is None:
        raise ValueError("augmented batches need a generator (their crops are seeded)")
    order = torch.randperm(len(y), generator=generator) if generator is not None else None
    if order is not None:
        order = order.to(x.device)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * std_t)  # uint8 -> [0, 1] -> standardised, in one multiply-add
    shift = -torch.tensor(mean, device=device).view(1, 3, 1, 1) / std_t
    stop = len(y) - (len(y) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = (
            order[start : start + batch_size]
            if order is not None
            else slice(start, start + batch_size)
        )
        # normalised at the stored resolution: resampling weights sum to 1, so this
        # equals normalising the (larger) output, at a fraction of the passes over it
        xb = torch.addcmul(shift, x[idx].to(device, non_blocking=True).float(), scale)
        if augment is not None:
            theta = crop_transforms(len(xb), augment, generator).to(device)  # type: ignore[arg-type]
            xb = resample(xb, theta, size, dtype)
        elif xb.shape[-2:] != (size, size):
            xb = F.interpolate(xb, size=(size, size), mode="bilinear", align_corners=False)
        yield xb.to(dtype), y[idx].to(device, non_blocking=True)
