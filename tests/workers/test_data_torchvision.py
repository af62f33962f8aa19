"""torchvision: dataset classes by name on files made here (MNIST's idx files, an
ImageFolder tree), read through the registry."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.spec import TrainConfig, TrialSpec
from tests.dataset_files import write_imagefolder, write_mnist
from workers import data
from workers.data import DATASETS, ImageData, SourceError, check_source
from workers.registry import RegistryError
from workers.trial import run_trial


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    data.clear_process_cache()
    yield tmp_path / "cache"
    data.clear_process_cache()


def load(**args: object) -> ImageData:
    return DATASETS.build("torchvision", args)


def test_mnist_from_its_idx_files(tmp_path: Path) -> None:
    written = write_mnist(tmp_path)
    got = load(name="MNIST", root=str(tmp_path), image_size=28)
    for x, y, split in ((got.train_x, got.train_y, "train"), (got.test_x, got.test_y, "test")):
        labels, images = written[split]
        assert y.tolist() == labels and x.shape == (len(labels), 3, 28, 28)
        # grey levels exactly, in each of the three channels
        assert torch.equal(x, torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1))
    # the class's own names: all ten, whichever labels the files hold
    assert got.num_classes == 10 and got.classes[:3] == ("0 - zero", "1 - one", "2 - two")


def test_split_arguments_pass_through(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    swapped = load(
        name="MNIST",
        root=str(tmp_path),
        image_size=28,
        train_args={"train": False},
        test_args={"train": True},
    )
    assert (len(swapped.train_y), len(swapped.test_y)) == (6, 12)


@pytest.mark.parametrize(
    ("name", "train", "test"),
    [
        ("MNIST", {"train": True}, {"train": False}),
        ("Flowers102", {"split": "train"}, {"split": "test"}),
        ("SVHN", {"split": "train"}, {"split": "test"}),
    ],
)
def test_default_split_arguments(name: str, train: dict, test: dict) -> None:
    config = DATASETS.make_config("torchvision", {"name": name})
    assert config.split_args() == {"train_args": train, "test_args": test}


def test_data_options_and_the_disk_cache(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_mnist(tmp_path)
    args = {"name": "MNIST", "root": str(tmp_path), "image_size": 28, "fraction": 0.5}
    got = data.load_dataset("torchvision", args)
    assert sorted(got.train_y.tolist()) == [0, 0, 1, 1, 2, 2]
    data.clear_process_cache()
    decoded = []
    real_build = DATASETS.build
    monkeypatch.setattr(DATASETS, "build", lambda *a, **k: decoded.append(a) or real_build(*a, **k))
    again, how = data.load_source("torchvision", args)
    assert how == "disk_cache" and decoded == [] and len(again.train_y) == 12


def test_image_folder_class_with_a_root_per_split_and_a_bad_file(tmp_path: Path) -> None:
    expected = write_imagefolder(tmp_path)
    bad = tmp_path / "train" / "dog" / "99.png"
    bad.write_bytes(b"garbage")
    args = {
        "name": "ImageFolder",
        "train_args": {"root": str(tmp_path / "train")},
        "test_args": {"root": str(tmp_path / "test")},
        "image_size": 32,
    }
    with pytest.raises(ValueError, match=re.escape(str(bad)) + r" cannot be decoded \("):
        load(**args)
    got = load(**args, on_bad_image="skip")
    assert len(got.skipped) == 1 and got.skipped[0].startswith(f"{bad}: ")
    assert got.classes == ("cat", "dog", "sea lion")
    assert got.train_y.tolist() == [label for label, _, _ in expected["train"]]
    png = [i for i, (_, _, lossless) in enumerate(expected["test"]) if lossless]
    for i in png:
        assert np.array_equal(got.test_x[i].permute(1, 2, 0).numpy(), expected["test"][i][1])


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ({"name": "Flowers"}, "name 'Flowers' is no torchvision.datasets class; close: Flowers102"),
        ({"name": "mnist"}, "close: .*MNIST"),
        ({"name": "ImageFolder"}, "takes neither train nor split: give train_args and test_args"),
        ({"name": "MNIST", "train_args": {"fold": 1}}, r"train_args: .* takes no \['fold'\]"),
        (
            {
                "name": "ImageFolder",
                "download": True,
                "train_args": {"root": "a"},
                "test_args": {"root": "b"},
            },
            "cannot download",
        ),
        ({"name": "MNIST", "on_bad_image": "maybe"}, "on_bad_image must be one of"),
    ],
)
def test_bad_arguments(args: dict, fragment: str) -> None:
    with pytest.raises(RegistryError, match=fragment):
        DATASETS.resolve_args("torchvision", args)


def test_check_finds_a_missing_root_unless_downloading(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    with pytest.raises(SourceError, match=re.escape(f"no folder {missing}")) as info:
        check_source("torchvision", {"name": "MNIST", "root": str(missing)})
    assert info.value.field == "root"
    check_source("torchvision", {"name": "MNIST", "root": str(missing), "download": True})


def test_relative_roots_key_the_cache_by_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = {"name": "ImageFolder", "train_args": {"root": "a"}, "test_args": {"root": "b"}}
    absolute = {
        "name": "ImageFolder",
        "train_args": {"root": str(tmp_path / "a")},
        "test_args": {"root": str(tmp_path / "b")},
    }
    assert data.cache_path("torchvision", args) == data.cache_path("torchvision", absolute)


# --------------------------------------------------------------------------- a trial


def test_a_trial_on_mnist_records_its_data(tmp_path: Path, cache: Path) -> None:
    write_mnist(tmp_path)
    args = {"name": "MNIST", "root": str(tmp_path), "image_size": 28, "val_fraction": 0.25}
    spec = TrialSpec(
        backbone="vit_test",
        method="full",
        dataset="torchvision",
        dataset_args=DATASETS.resolve_args("torchvision", args),
        train=TrainConfig(epochs=1, batch_size=4, max_steps=2),
    )
    record = run_trial(spec, num_threads=1)
    assert record.status == "ok", record.error
    assert record.data_source == "decoded" and record.train_images == 9
    assert record.data_skipped_images == 0 and 0.0 <= record.val_accuracy <= 1.0
