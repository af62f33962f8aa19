"""Training and evaluation batches cut from a whole dataset with tensor ops.

Every step is one batched call on the trial's device: gather, then crop (with
augmentation, a seeded random-resized crop and flip drawn for the whole batch at once),
resize, normalise and convert in one ``resample`` (no PIL, no per-image transform). On
the CPU a batch is written into a buffer of an earlier batch that nothing holds any more
(``_Buffers``) rather than into new memory, by the caller's intra-op threads (a trial's:
its CPUs; ``benchmarks/data.py`` measures them against one thread).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from workers.data.core import DataOptions, pair
from workers.data.resample import resample

log = logging.getLogger(__name__)

# Buffers one ``batches`` call reuses on the CPU: a loop holds its last batch while it
# asks for the next, so two take turns; a third covers a consumer holding one more.
_POOL_SIZE = 3
# How many references a tensor's memory has; private to torch, hence read with a
# fallback (no reuse) and a test that fails when reuse stops (test_data_buffers.py).
_use_count = getattr(torch._C, "_storage_Use_Count", None)


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

    Every step is one batched tensor op on ``device``: gather, then crop + flip + resize
    + normalise in one ``resample`` (crop maps drawn from ``generator`` with
    ``augment``, else the whole image). ``x`` may already live on ``device``. A trial
    that computes in bf16 asks for bf16 batches: autocast would cast them at the first
    layer. A CPU batch may reuse the memory of an earlier one of the same call, only once
    no tensor over that memory is alive (kept batches stay intact).
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
    buffers = _Buffers() if device.type == "cpu" else None
    for start in range(0, stop, batch_size):
        idx = (
            order[start : start + batch_size]
            if order is not None
            else slice(start, start + batch_size)
        )
        # index_select copies whole images, advanced indexing element by element
        xb = x[idx] if isinstance(idx, slice) else x.index_select(0, idx)
        xb = xb.to(device, non_blocking=True)
        # no name keeps the buffer here: a batch its consumer dropped is free
        shape = (len(xb), xb.shape[1], size, size)
        out = buffers.take(shape, dtype) if buffers is not None else None
        xb = _images(xb, size, scale, shift, dtype, augment, generator, out)
        del out
        yield xb, y[idx].to(device, non_blocking=True)


def _images(
    xb: torch.Tensor,
    size: int,
    scale: torch.Tensor,
    shift: torch.Tensor,
    dtype: torch.dtype,
    augment: Augment | None,
    generator: torch.Generator | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The uint8 batch ``xb`` at ``size`` px, normalised, as ``dtype`` (in ``out`` when
    given): randomly cropped and flipped with ``augment``, else resized whole
    (``F.interpolate``'s bilinear)."""
    if augment is not None:
        theta = crop_transforms(len(xb), augment, generator).to(xb.device)  # type: ignore[arg-type]
    elif xb.shape[-2:] != (size, size):
        theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=xb.device)
        theta = theta.expand(len(xb), 2, 3)
    else:
        normalised = torch.addcmul(shift, xb.float(), scale)
        return normalised.to(dtype) if out is None else out.copy_(normalised)
    return resample(xb, theta, size, dtype, scale, shift, out=out)


class _Buffers:
    """Up to ``_POOL_SIZE`` CPU buffers for one call's batches, each handed out as a view
    and reused only when no tensor over its memory is left: views, aliases (``.to``),
    autograd's saved tensors and numpy arrays all count, so a kept batch is never
    overwritten. A new fp32 batch of 64 at 224 px (38.5 MB) is mapped fresh by the
    allocator and zero-filled by the kernel on first touch, half of its making time
    (docs/measurements.md, ``benchmarks/data.py``); a reused one is not. Only a buffer of
    the batch's exact shape is reused: a batch's storage is its own size, as memory
    meters that count storages expect."""

    def __init__(self) -> None:
        self.pool: list[tuple[torch.Tensor, int]] = []  # (buffer, its use count unviewed)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A view of a buffer of ``shape`` and ``dtype`` that nothing else holds."""
        for buffer, free in self.pool:
            if buffer.shape == shape and buffer.dtype == dtype and _holders(buffer) == free:
                return buffer.view(shape)
        buffer = torch.empty(shape, dtype=dtype)
        if _use_count is not None and len(self.pool) < _POOL_SIZE:
            self.pool.append((buffer, _holders(buffer)))
        return buffer.view(shape)


def _holders(buffer: torch.Tensor) -> int:
    """References to ``buffer``'s memory: itself, and every tensor viewing it."""
    return _use_count(buffer.untyped_storage()._cdata)  # type: ignore[misc]
