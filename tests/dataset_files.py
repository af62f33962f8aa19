"""Tiny copies of datasets in their official on-disk formats, made for tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR_CLASSES = [b"apple", b"bear", b"cloud"]


def _cifar_rows(per_class: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    labels = [c for c in range(len(CIFAR_CLASSES)) for _ in range(per_class)]
    return rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), labels


def write_cifar(root: Path, protocol: int = 2) -> dict[str, tuple[np.ndarray, list[int]]]:
    """3 classes x 4 train / 2 test images, pickled like the official Python 2 files."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train, test = _cifar_rows(4, seed=1), _cifar_rows(2, seed=2)
    train[0][0, 0] = 7  # red, row 0, column 0
    train[0][0, 1024 + 31] = 200  # green, row 0, column 31
    train[0][0, 2048 + 5 * 32 + 3] = 99  # blue, row 5, column 3
    test[0][:] = 255  # a test split unlike train: statistics must ignore it
    for name, (data, labels) in (("train", train), ("test", test)):
        entry = {b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))
    meta = {b"fine_label_names": CIFAR_CLASSES, b"coarse_label_names": [b"all"]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return {"train": train, "test": test}
