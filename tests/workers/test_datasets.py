"""Datasets: split disjointness, determinism, batch shapes and normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.data import (
    DATASETS,
    Augment,
    DataOptions,
    ImageData,
    batches,
    crop_transforms,
    data_options,
    load_dataset,
    load_source,
    resample,
    resident_on,
    select,
)
from workers.registry import RegistryError


def test_digits_is_complete_split_and_disjoint() -> None:
    data = load_dataset("digits", {"image_size": 16})
    assert data.num_classes == 10 and data.classes == tuple("0123456789")
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
    a = load_dataset("synthetic", {"images_per_class": 10})
    b = load_dataset("synthetic", {"images_per_class": 10})
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
        ("mnist", {}, "valid: cifar100, digits, dtd, hf, imagefolder, synthetic, torchvision"),
        ("digits", {"fraction": 0.0}, r"fraction must be in \(0, 1\]"),
        ("digits", {"fraction": 0.5, "per_class": 3}, "fraction or per_class, not both"),
        ("digits", {"per_class": -1}, "per_class must be >= 0"),
        ("digits", {"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        ("digits", {"crop_scale": [0.5, 0.2]}, "crop_scale must satisfy"),
        ("digits", {"crop_scale": [0.5]}, "crop_scale must be two numbers"),
        ("digits", {"crop_ratio": [0, 1]}, "crop_ratio must satisfy"),
        ("digits", {"resident": "maybe"}, "resident must be one of"),
        ("digits", {"augment": "yes"}, "'augment' must be bool"),
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


# --------------------------------------------------------------------------- subsets


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(img.flatten().numpy()) for img in x}


def test_validation_split_is_stratified_disjoint_and_fixed_by_seed() -> None:
    full = load_dataset("synthetic", {"images_per_class": 40})  # 30 train per class
    args = {"images_per_class": 40, "val_fraction": 0.2}
    data = load_dataset("synthetic", args)
    assert data.val_x is not None and data.val_y is not None
    assert torch.bincount(data.val_y).tolist() == [6] * 4  # 20% of each class
    assert torch.bincount(data.train_y).tolist() == [24] * 4
    # train and validation partition the source's train split; test is untouched
    assert not _rows(data.train_x) & _rows(data.val_x)
    assert _rows(data.train_x) | _rows(data.val_x) == _rows(full.train_x)
    assert torch.equal(data.test_x, full.test_x)
    again = load_dataset("synthetic", args)
    other = load_dataset("synthetic", dict(args, split_seed=1))
    assert torch.equal(again.val_x, data.val_x)
    assert _rows(other.val_x) != _rows(data.val_x)


@pytest.mark.parametrize(
    ("options", "per_class"),
    [({"fraction": 0.25}, 8), ({"per_class": 5}, 5), ({"per_class": 500}, 32)],
)
def test_subset_is_stratified_and_inside_the_train_split(options: dict, per_class: int) -> None:
    full = load_dataset("synthetic", {"images_per_class": 43})  # 32 train per class
    data = load_dataset("synthetic", {"images_per_class": 43, **options})
    assert torch.bincount(data.train_y, minlength=4).tolist() == [per_class] * 4
    assert _rows(data.train_x) <= _rows(full.train_x)
    assert torch.equal(data.test_y, full.test_y)


def test_subset_after_validation_never_overlaps_it() -> None:
    data = load_dataset("synthetic", {"images_per_class": 43, "val_fraction": 0.25, "per_class": 4})
    assert torch.bincount(data.train_y).tolist() == [4] * 4
    assert torch.bincount(data.val_y).tolist() == [8] * 4
    assert not _rows(data.train_x) & _rows(data.val_x)


def test_without_options_the_source_is_not_copied(synthetic_data: ImageData) -> None:
    assert select(synthetic_data, DataOptions()) is synthetic_data


def test_options_do_not_change_the_decoded_source() -> None:
    plain, _ = load_source("synthetic", {"images_per_class": 9})
    optioned, how = load_source("synthetic", {"images_per_class": 9, "augment": True})
    assert optioned is plain and how == "process_cache"
    assert data_options("synthetic", {"augment": True}).augment is True


# --------------------------------------------------------------------------- augmentation


def _augmented(d: ImageData, seed: int, augment: Augment, size: int = 24) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat(
        [
            xb
            for xb, _ in batches(
                d.train_x,
                d.train_y,
                16,
                size=size,
                mean=d.mean,
                std=d.std,
                device=torch.device("cpu"),
                generator=gen,
                augment=augment,
            )
        ]
    )


def test_augmentation_is_determined_by_the_seed(synthetic_data: ImageData) -> None:
    augment = Augment(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True)
    a = _augmented(synthetic_data, 5, augment)
    assert a.shape == (len(synthetic_data.train_y), 3, 24, 24)
    assert torch.equal(a, _augmented(synthetic_data, 5, augment))
    assert not torch.allclose(a, _augmented(synthetic_data, 6, augment))


def test_full_crop_is_the_image_or_its_mirror(synthetic_data: ImageData) -> None:
    d = synthetic_data
    identity = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True)
    out = _augmented(d, 0, identity, size=16)  # the stored size: no resampling
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(d.train_y), generator=gen)
    mean = torch.tensor(d.mean).view(1, 3, 1, 1)
    std = torch.tensor(d.std).view(1, 3, 1, 1)
    plain = (d.train_x[order].float() / 255 - mean) / std
    same = (out - plain).abs().amax(dim=(1, 2, 3)) < 1e-4
    mirrored = (out - plain.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-4
    assert (same ^ mirrored).all()  # each image exactly one of the two
    assert 0.2 < mirrored.float().mean() < 0.8  # both happen (p = 1/2)


@pytest.mark.parametrize("seed", range(4))
def test_crop_samples_the_region_it_names(seed: int) -> None:
    # on a horizontal ramp (value = 8 x column), every output pixel's value is the
    # input column its crop map sends it to: the batch is the crop crop_transforms drew
    ramp = (torch.arange(32) * 8).to(torch.uint8).view(1, 1, 1, 32).expand(2, 3, 32, 32)
    augment = Augment(scale=(0.2, 0.6), ratio=(0.5, 2.0), flip=True)
    gen = torch.Generator().manual_seed(seed)
    xb, _ = next(
        batches(
            ramp.contiguous(),
            torch.zeros(2, dtype=torch.long),
            2,
            size=20,
            mean=(0.0,) * 3,
            std=(1 / 255,) * 3,  # output = stored value
            device=torch.device("cpu"),
            generator=gen,
            augment=augment,
        )
    )
    replay = torch.Generator().manual_seed(seed)
    torch.randperm(2, generator=replay)
    theta = crop_transforms(2, augment, replay)
    u = (2 * torch.arange(20.0) + 1) / 20 - 1  # output pixel centres, normalised
    x = theta[:, 0, 0, None] * u + theta[:, 0, 2, None]  # input position, normalised
    column = (((x + 1) * 32 - 1) / 2).clamp(0, 31)
    expected = (8 * column).view(2, 1, 1, 20).expand(2, 3, 20, 20)
    assert torch.allclose(xb, expected, atol=1e-3)


@pytest.mark.parametrize(("side", "size"), [(8, 24), (16, 32), (7, 40)])
def test_separable_resample_equals_grid_sample(side: int, size: int) -> None:
    x = torch.rand(6, 3, side, side) * 255
    theta = crop_transforms(6, Augment((0.08, 1.0), (0.5, 2.0), True), torch.Generator())
    grid = F.affine_grid(theta, [6, 3, size, size], align_corners=False)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert torch.allclose(resample(x, theta, size), expected, atol=1e-3)


def test_bf16_batches_are_the_fp32_ones_rounded(synthetic_data: ImageData) -> None:
    augment = Augment(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True)
    d = synthetic_data

    def first(dtype: torch.dtype) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        return next(
            batches(
                d.train_x, d.train_y, 16, size=64, mean=d.mean, std=d.std,
                device=torch.device("cpu"), generator=gen, augment=augment, dtype=dtype,
            )
        )[0]  # fmt: skip

    fp32, bf16 = first(torch.float32), first(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: relative error about 2^-8 of the values' range
    assert (bf16.float() - fp32).abs().max() < 0.02 * fp32.abs().max()


def test_crop_areas_and_ratios_follow_the_options() -> None:
    augment = Augment(scale=(0.25, 0.5), ratio=(0.5, 2.0), flip=False)
    theta = crop_transforms(4000, augment, torch.Generator().manual_seed(0))
    w, h = theta[:, 0, 0], theta[:, 1, 1]
    assert (w > 0).all()  # no flips
    area = w * h
    clipped = (w >= 1) | (h >= 1)
    assert area[~clipped].min() >= 0.25 - 1e-6 and area.max() <= 0.5 + 1e-6
    assert (w / h).min() >= 0.5 - 1e-5 and (w / h).max() <= 2.0 + 1e-5
    # the crop lies inside the image
    assert ((theta[:, 0, 2].abs() + w) <= 1 + 1e-6).all()
    assert ((theta[:, 1, 2].abs() + h) <= 1 + 1e-6).all()
    flips = crop_transforms(4000, Augment((1.0, 1.0), (1.0, 1.0), True), torch.Generator())
    assert 0.45 < (flips[:, 0, 0] < 0).float().mean() < 0.55


def test_augmentation_needs_a_generator(synthetic_data: ImageData) -> None:
    d = synthetic_data
    with pytest.raises(ValueError, match="need a generator"):
        next(
            batches(
                d.train_x,
                d.train_y,
                4,
                size=16,
                mean=d.mean,
                std=d.std,
                device=torch.device("cpu"),
                augment=Augment((0.5, 1.0), (1.0, 1.0), True),
            )
        )


def test_augment_of_options() -> None:
    assert Augment.of(DataOptions()) is None
    assert Augment.of(DataOptions(augment=True, crop_scale=(0.3, 0.9), flip=False)) == Augment(
        (0.3, 0.9), (3 / 4, 4 / 3), False
    )


# --------------------------------------------------------------------------- residency


def test_residency_rule(synthetic_data: ImageData) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    mb = synthetic_data.nbytes / 2**20
    auto = DataOptions()
    assert not resident_on(cpu, DataOptions(resident="always"), synthetic_data, 1.0)
    assert resident_on(cuda, auto, synthetic_data, budget_mb=8 * mb)
    assert not resident_on(cuda, auto, synthetic_data, budget_mb=7.9 * mb)
    assert resident_on(cuda, DataOptions(resident="always"), synthetic_data, 0.001)
    assert not resident_on(cuda, DataOptions(resident="never"), synthetic_data, 1e6)
    assert synthetic_data.to(cpu) is synthetic_data
