"""Dataset registry: whole datasets as uint8 tensors, batches made with tensor ops.

A dataset is decoded once into ``uint8`` tensors of shape (N, 3, H, W) at a stored
resolution; batches are cut from them on the trial's device, converted, resized to
the backbone's input size and normalised in one batched call (no per-image Python).

``digits`` (scikit-learn's bundled 8x8 digits) is the offline default;
``synthetic`` is generated and exists for tests and overhead measurements.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from workers.registry import Registry

log = logging.getLogger(__name__)

DATASETS = Registry("dataset")

# The split of every dataset is fixed (not the trial's seed): all trials of a sweep,
# whatever their seed, are evaluated on the same held-out images.
SPLIT_SEED = 0


@dataclass
class ImageData:
    """Train and held-out test split as uint8 tensors, plus what is needed to feed them."""

    train_x: torch.Tensor  # (N, 3, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, float, float]  # per-channel, of the [0, 1] images
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        for name in ("train_x", "test_x"):
            x = getattr(self, name)
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(
                    f"{name} must be uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}"
                )
        if len(self.train_x) != len(self.train_y) or len(self.test_x) != len(self.test_y):
            raise ValueError("images and labels differ in length")


def load_dataset(name: str, args: dict | None) -> ImageData:
    """Load registered dataset ``name`` with grid arguments ``args``.

    A worker process that runs several trials decodes each dataset once (the last
    two are kept); callers must not modify the returned tensors in place.
    """
    return _load_cached(name, json.dumps(args or {}, sort_keys=True))


@functools.lru_cache(maxsize=2)
def _load_cached(name: str, args_json: str) -> ImageData:
    data = DATASETS.build(name, json.loads(args_json))
    log.info(
        "dataset %s: %d train / %d test images, %d classes, stored at %d px",
        name,
        len(data.train_y),
        len(data.test_y),
        data.num_classes,
        data.train_x.shape[-1],
    )
    return data


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
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised float batches at ``size`` px; shuffled when ``generator`` is given."""
    order = torch.randperm(len(y), generator=generator) if generator is not None else None
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    stop = len(y) - (len(y) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = (
            order[start : start + batch_size]
            if order is not None
            else slice(start, start + batch_size)
        )
        xb = x[idx].to(device, non_blocking=True).float().div_(255.0)
        if xb.shape[-1] != size or xb.shape[-2] != size:
            xb = F.interpolate(xb, size=(size, size), mode="bilinear", align_corners=False)
        yield (xb - mean_t) / std_t, y[idx].to(device, non_blocking=True)


def _stratified_split(labels: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a per-class split with a fixed seed; disjoint by construction."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = max(1, round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _from_arrays(images: np.ndarray, labels: np.ndarray, test_fraction: float) -> ImageData:
    """(N, 3, H, W) uint8 images + labels -> split ImageData with train-split statistics."""
    train_idx, test_idx = _stratified_split(labels, test_fraction)
    x = torch.from_numpy(np.ascontiguousarray(images))
    y = torch.from_numpy(labels.astype(np.int64))
    train_f = x[train_idx].float().div(255.0)
    mean = tuple(train_f.mean(dim=(0, 2, 3)).tolist())
    std = tuple(train_f.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return ImageData(
        x[train_idx],
        y[train_idx],
        x[test_idx],
        y[test_idx],
        num_classes=int(labels.max()) + 1,
        mean=mean,
        std=std,
    )


@dataclass(frozen=True)
class DigitsConfig:
    image_size: int = 32  # stored resolution (the 8x8 originals are upsampled once)
    test_fraction: float = 0.2  # held-out share of each class

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


@DATASETS.register(config_cls=DigitsConfig)
def digits(config: DigitsConfig) -> ImageData:
    """scikit-learn's bundled handwritten digits: 1797 images, 10 classes, offline."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    gray = F.interpolate(gray, size=(config.image_size,) * 2, mode="bilinear", align_corners=False)
    images = (gray.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    return _from_arrays(images.numpy(), bunch.target, config.test_fraction)


@dataclass(frozen=True)
class SyntheticConfig:
    num_classes: int = 4
    per_class: int = 64  # images per class, before the split
    image_size: int = 16
    test_fraction: float = 0.25
    noise: float = 0.25  # std of the Gaussian pixel noise, in [0, 1] units

    def __post_init__(self) -> None:
        if self.num_classes < 2 or self.per_class < 2 or self.image_size < 4:
            raise ValueError("synthetic needs num_classes >= 2, per_class >= 2, image_size >= 4")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


@DATASETS.register(config_cls=SyntheticConfig)
def synthetic(config: SyntheticConfig) -> ImageData:
    """Generated stripes: class k has its own orientation and colour (tests only)."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    n, s = config.num_classes * config.per_class, config.image_size
    labels = torch.arange(config.num_classes).repeat_interleave(config.per_class)
    angle = labels.float() * torch.pi / config.num_classes
    coords = torch.linspace(-1, 1, s)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    phase = torch.rand(n, 1, 1, generator=gen) * 2 * torch.pi
    wave = torch.sin(
        3 * torch.pi * (xx * angle.cos().view(-1, 1, 1) + yy * angle.sin().view(-1, 1, 1)) + phase
    )
    colour = torch.stack([(labels + c) % 3 == 0 for c in range(3)], 1).float() * 0.5 + 0.25
    img = 0.5 + 0.5 * wave.unsqueeze(1) * colour.view(n, 3, 1, 1)
    img = img + config.noise * torch.randn(n, 3, s, s, generator=gen)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return _from_arrays(images.numpy(), labels.numpy(), config.test_fraction)
