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


# --------------------------------------------------------------------------- own data

# Digit images standing for three classes, named unsorted: class indices must follow
# the sorted names (cat, dog, sea_lion), and "_" reads as a space in class names.
OWN_CLASSES = {"sea_lion": 0, "cat": 1, "dog": 2}  # folder name -> the digit it shows
OWN_SIZE = 32


def digit_images(digit: int, count: int, offset: int = 0) -> list[np.ndarray]:
    """``count`` sklearn digits ``digit`` as (32, 32, 3) uint8, one tint per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    picks = np.flatnonzero(bunch.target == digit)[offset : offset + count]
    out = []
    for k in picks:
        gray = Image.fromarray((bunch.images[k] * 255 / 16).astype(np.uint8))
        big = np.asarray(gray.resize((OWN_SIZE, OWN_SIZE), Image.Resampling.BILINEAR))
        tint = np.array([1.0, 0.5 + 0.25 * digit, 1.0 - 0.3 * digit])
        out.append((big[..., None] * tint).clip(0, 255).astype(np.uint8))
    return out


def own_split(split: str) -> dict[str, list[np.ndarray]]:
    """Class name -> its images of ``split`` (4 train, 2 test images per class)."""
    count, offset = (4, 0) if split == "train" else (2, 10)
    return {name: digit_images(d, count, offset) for name, d in OWN_CLASSES.items()}


def write_imagefolder(
    root: Path, held_out: str = "test"
) -> dict[str, list[tuple[int, np.ndarray, bool]]]:
    """root/{train,<held_out>}/<class>/NN.png|jpg: even NN as PNG, odd NN as JPEG.

    Returns, per split, (label, pixels, lossless) in the order the decode stores them:
    sorted class, then sorted file name.
    """
    from PIL import Image

    expected: dict[str, list[tuple[int, np.ndarray, bool]]] = {}
    for split, folder in (("train", "train"), ("test", held_out)):
        images = own_split(split)
        for name, arrays in images.items():
            (root / folder / name).mkdir(parents=True)
            for j, pixels in enumerate(arrays):
                suffix = "png" if j % 2 == 0 else "jpg"
                Image.fromarray(pixels).save(root / folder / name / f"{j:02d}.{suffix}")
        expected[split] = [
            (label, pixels, j % 2 == 0)
            for label, name in enumerate(sorted(images))
            for j, pixels in enumerate(images[name])
        ]
    return expected


def write_hf(folder: Path, *, label_names: bool = True, bad_row: bool = False) -> dict:
    """A DatasetDict (train, test) with an Image column and a ClassLabel column (or
    string labels), saved with ``save_to_disk``. Returns split -> (labels, pixels)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
    from PIL import Image as PILImage

    names = sorted(OWN_CLASSES)  # label k is the k-th sorted name
    splits, expected = {}, {}
    for split in ("train", "test"):
        images = own_split(split)
        rows = [(names.index(n), p) for n in OWN_CLASSES for p in images[n]]  # unsorted
        expected[split] = ([label for label, _ in rows], [p for _, p in rows])
        pil = [PILImage.fromarray(p) for _, p in rows]
        labels: list = [label for label, _ in rows]
        if not label_names:
            labels = [names[label] for label in labels]
        if bad_row and split == "train":
            pil.append({"bytes": b"not an image at all", "path": None})
            labels.append(labels[0])
        label_feature = ClassLabel(names=names) if label_names else Value("string")
        features = Features({"image": Image(), "label": label_feature})
        splits[split] = Dataset.from_dict({"image": pil, "label": labels}, features=features)
    DatasetDict(splits).save_to_disk(str(folder))
    return expected


def write_mnist(root: Path) -> dict[str, tuple[list[int], np.ndarray]]:
    """root/MNIST/raw/ idx files as torchvision's MNIST reads them: digits 0, 1, 2 at
    28 px, 4 train and 2 test images each. Returns split -> (labels, (N, 28, 28))."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    written = {}
    for split, prefix, count, offset in (("train", "train", 4, 0), ("test", "t10k", 2, 10)):
        labels = [d for d in range(3) for _ in range(count)]
        picks = [
            np.flatnonzero(bunch.target == d)[offset + j] for d in range(3) for j in range(count)
        ]
        images = np.stack(
            [
                np.asarray(
                    Image.fromarray((bunch.images[k] * 255 / 16).astype(np.uint8)).resize((28, 28))
                )
                for k in picks
            ]
        )
        header = np.array([2051, len(images), 28, 28], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = np.array([2049, len(labels)], dtype=">i4").tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(header + bytes(labels))
        written[split] = (labels, images)
    return written
