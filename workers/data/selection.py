"""Which images a trial uses, and the fixed split of sources that have no official one.

Every pick is stratified (per class) and seeded, so that the same options give the
same images on any machine, and nothing here copies or changes the decoded tensors
beyond indexing them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from workers.data.core import SPLIT_SEED, DataOptions, ImageData

log = logging.getLogger(__name__)


def select(data: ImageData, options: DataOptions) -> ImageData:
    """The images a trial uses: a stratified validation split held out of train (fixed
    by ``split_seed``; never overlaps train), then a stratified subset of what is left.
    The test split is never subset. Without either, ``data`` itself (no copy)."""
    subset = options.fraction < 1.0 or options.per_class > 0
    if not options.val_fraction and not subset:
        return data
    labels = data.train_y.cpu().numpy()
    rng = np.random.default_rng(options.split_seed)
    keep = np.arange(len(labels))
    val_idx = None
    if options.val_fraction:
        share = options.val_fraction
        # every class keeps at least one training image
        val_idx, keep = per_class_pick(labels, lambda n: min(n - 1, max(1, round(n * share))), rng)
    if subset:
        cap, share = options.per_class, options.fraction
        count = (lambda n: min(n, cap)) if cap else (lambda n: max(1, round(n * share)))
        picked, _ = per_class_pick(labels[keep], count, rng)
        keep = keep[picked]
    if val_idx is not None and not len(val_idx):
        raise ValueError(f"val_fraction={options.val_fraction} leaves no validation image")
    train = torch.from_numpy(keep).to(data.train_x.device)
    val = torch.from_numpy(val_idx).to(data.train_x.device) if val_idx is not None else None
    return dataclasses.replace(
        data,
        train_x=data.train_x[train],
        train_y=data.train_y[train],
        val_x=data.train_x[val] if val is not None else data.val_x,
        val_y=data.train_y[val] if val is not None else data.val_y,
    )


def per_class_pick(
    labels: np.ndarray, count: Callable[[int], int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, ``count(n)`` indices drawn at random and the rest; both sorted."""
    picked, rest = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        k = count(len(idx))
        picked.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(picked)), np.sort(np.concatenate(rest))


def split_arrays(
    images: np.ndarray, labels: np.ndarray, test_fraction: float, classes: Sequence[str]
) -> ImageData:
    """(N, 3, H, W) uint8 images + labels -> ImageData split per class with a fixed
    seed (disjoint by construction), statistics from its train split."""
    rng = np.random.default_rng(SPLIT_SEED)
    test_idx, train_idx = per_class_pick(labels, lambda n: max(1, round(n * test_fraction)), rng)
    x = torch.from_numpy(np.ascontiguousarray(images))
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageData.from_splits(x[train_idx], y[train_idx], x[test_idx], y[test_idx], classes)
