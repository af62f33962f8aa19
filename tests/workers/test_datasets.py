"""Datasets: split disjointness, determinism, batch shapes and normalisation."""

from __future__ import annotations

import pytest
import torch

from workers.datasets import DATASETS, ImageData, batches, load_dataset
from workers.registry import RegistryError


def test_digits_is_complete_split_and_disjoint() -> None:
    data = load_dataset("digits", {"image_size": 16})
    assert data.num_classes == 10
    assert len(data.train_y) + len(data.test_y) == 1797
    assert data.train_x.shape[1:] == (3, 16, 16) and data.train_x.dtype == torch.uint8
    assert 0.18 < len(data.test_y) / 1797 < 0.22
    # every class is in both splits
    assert set(data.train_y.tolist()) == set(data.test_y.tolist()) == set(range(10))
    # no training image reappears in the test split
    train = {bytes(x.flatten().numpy()) for x in data.train_x}
    test = {bytes(x.flatten().numpy()) for x in data.test_x}
    assert len(train & test) <= 2  # sklearn's digits hold two exact duplicate images


def test_split_is_fixed_across_loads() -> None:
    a = load_dataset("synthetic", {"per_class": 10})
    b = load_dataset("synthetic", {"per_class": 10})
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)


def test_batches_resize_normalise_and_cover_the_split(synthetic_data: ImageData) -> None:
    d = synthetic_data
    gen = torch.Generator().manual_seed(3)
    seen = []
    for xb, yb in batches(
        d.train_x,
        d.train_y,
        10,
        size=32,
        mean=d.mean,
        std=d.std,
        device=torch.device("cpu"),
        generator=gen,
    ):
        assert xb.shape[1:] == (3, 32, 32) and xb.dtype == torch.float32
        seen.append(yb)
    labels = torch.cat(seen)
    assert sorted(labels.tolist()) == sorted(d.train_y.tolist())
    # with the train split's statistics, the whole split is ~zero-mean per channel
    full = next(
        batches(
            d.train_x,
            d.train_y,
            len(d.train_y),
            size=16,
            mean=d.mean,
            std=d.std,
            device=torch.device("cpu"),
        )
    )[0]
    assert full.mean(dim=(0, 2, 3)).abs().max() < 1e-4


def test_shuffle_is_seeded(synthetic_data: ImageData) -> None:
    d = synthetic_data

    def order(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat(
            [
                y
                for _, y in batches(
                    d.train_x,
                    d.train_y,
                    8,
                    size=16,
                    mean=d.mean,
                    std=d.std,
                    device=torch.device("cpu"),
                    generator=gen,
                )
            ]
        ).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_drop_last(synthetic_data: ImageData) -> None:
    d = synthetic_data
    n = sum(
        len(y)
        for _, y in batches(
            d.train_x,
            d.train_y,
            7,
            size=16,
            mean=d.mean,
            std=d.std,
            device=torch.device("cpu"),
            drop_last=True,
        )
    )
    assert n == len(d.train_y) // 7 * 7


@pytest.mark.parametrize(
    ("name", "args", "fragment"),
    [
        ("digits", {"image_size": 4}, "image_size must be >= 8"),
        ("digits", {"test_fraction": 1.0}, "test_fraction must be in"),
        ("synthetic", {"num_classes": 1}, "num_classes >= 2"),
        ("mnist", {}, "valid: cifar100, digits, dtd, synthetic"),
    ],
)
def test_bad_dataset_arguments(name: str, args: dict, fragment: str) -> None:
    with pytest.raises(RegistryError, match=fragment):
        DATASETS.resolve_args(name, args)


def test_imagedata_rejects_wrong_layout() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageData(
            torch.zeros(2, 16, 16, 3),
            torch.zeros(2),
            torch.zeros(1, 3, 4, 4, dtype=torch.uint8),
            torch.zeros(1),
            2,
            (0.5,) * 3,
            (0.5,) * 3,
        )
