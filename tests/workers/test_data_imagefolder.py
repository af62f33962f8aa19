"""imagefolder: class-per-folder PNG/JPEG trees made here, read through the registry."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.spec import TrainConfig, TrialSpec
from tests.dataset_files import write_imagefolder
from workers import data
from workers.data import DATASETS, ImageData, SourceError, check_source
from workers.registry import RegistryError
from workers.trial import run_trial

CLASSES = ("cat", "dog", "sea lion")  # sorted folder names, "_" read as a space


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A decode cache of this test's own, and no dataset decoded by another test."""
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    data.clear_process_cache()
    yield tmp_path / "cache"
    data.clear_process_cache()


def load(**args: object) -> ImageData:
    return DATASETS.build("imagefolder", args)  # no cache: each test sees its files


def assert_holds(x: torch.Tensor, y: torch.Tensor, expected: list) -> None:
    """Labels in order, PNG pixels exact, JPEG pixels close."""
    assert y.tolist() == [label for label, _, _ in expected]
    assert x.shape == (len(expected), 3, 32, 32) and x.dtype == torch.uint8
    for img, (_, pixels, lossless) in zip(x, expected, strict=True):
        stored = img.permute(1, 2, 0).numpy()
        if lossless:
            assert np.array_equal(stored, pixels)
        else:
            assert np.abs(stored.astype(int) - pixels).mean() < 4


@pytest.mark.parametrize("held_out", ["test", "val"])
def test_reads_every_image_with_its_class(tmp_path: Path, held_out: str) -> None:
    expected = write_imagefolder(tmp_path, held_out)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image: ignored")
    got = load(root=str(tmp_path), image_size=32)
    assert got.classes == CLASSES and got.num_classes == 3 and got.skipped == ()
    assert_holds(got.train_x, got.train_y, expected["train"])
    assert_holds(got.test_x, got.test_y, expected["test"])
    train_f = got.train_x.float().div(255)
    assert got.mean == pytest.approx(train_f.mean(dim=(0, 2, 3)).tolist(), abs=1e-5)


def test_explicit_train_and_test_folders(tmp_path: Path) -> None:
    expected = write_imagefolder(tmp_path / "mine", held_out="holdout")
    got = load(
        train=str(tmp_path / "mine" / "train"),
        test=str(tmp_path / "mine" / "holdout"),
        image_size=32,
    )
    assert_holds(got.test_x, got.test_y, expected["test"])
    assert len(got.train_y) == 12


def test_stored_resolution(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    got = load(root=str(tmp_path), image_size=16)
    assert got.train_x.shape == (12, 3, 16, 16) and got.test_x.shape == (6, 3, 16, 16)


def test_data_options_apply(tmp_path: Path, cache: Path) -> None:
    write_imagefolder(tmp_path)
    args = {"root": str(tmp_path), "image_size": 32, "per_class": 2, "val_fraction": 0.25}
    got = data.load_dataset("imagefolder", args)
    # per class: 4 training images, 1 held out for validation, then at most 2 kept
    assert sorted(got.train_y.tolist()) == [0, 0, 1, 1, 2, 2]
    assert sorted(got.val_y.tolist()) == [0, 1, 2] and len(got.test_y) == 6
    train = {bytes(x.numpy()) for x in got.train_x}
    assert not train & {bytes(x.numpy()) for x in got.val_x}
    assert data.data_options("imagefolder", args).augment is False


def test_decoded_once_then_read_from_the_disk_cache(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_imagefolder(tmp_path / "images")
    args = {"root": str(tmp_path / "images"), "image_size": 32}
    first, how = data.load_source("imagefolder", args)
    assert how == "decoded" and data.cache_path("imagefolder", args).is_file()
    data.clear_process_cache()  # a new process
    decoded = []
    real_build = DATASETS.build
    monkeypatch.setattr(DATASETS, "build", lambda *a, **k: decoded.append(a) or real_build(*a, **k))
    second, how = data.load_source("imagefolder", args)
    assert how == "disk_cache" and decoded == []
    assert torch.equal(first.train_x, second.train_x) and second.classes == CLASSES
    # a relative root names the same folder: the same cache entry
    monkeypatch.chdir(tmp_path)
    relative = data.cache_path("imagefolder", {"root": "images", "image_size": 32})
    assert relative == data.cache_path("imagefolder", args)


def test_shared_through_the_object_store_form(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    got = load(root=str(tmp_path), image_size=32, on_bad_image="skip")
    back = data.from_shared(data.to_shared(got))
    assert torch.equal(back.train_x, got.train_x) and back.classes == got.classes


# --------------------------------------------------------------------------- bad images


def _corrupt(root: Path) -> Path:
    bad = root / "train" / "dog" / "99.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return bad


def test_a_bad_image_fails_the_decode_naming_file_and_reason(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    bad = _corrupt(tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(bad)) + r".*cannot be decoded \(\w+"):
        load(root=str(tmp_path), image_size=32)


def test_a_bad_image_is_skipped_named_and_counted(tmp_path: Path) -> None:
    expected = write_imagefolder(tmp_path)
    bad = _corrupt(tmp_path)
    got = load(root=str(tmp_path), image_size=32, on_bad_image="skip")
    assert len(got.skipped) == 1 and got.skipped[0].startswith(f"{bad}: ")
    assert_holds(got.train_x, got.train_y, expected["train"])  # all the good ones, in order


def test_on_bad_image_keys_the_cache(tmp_path: Path) -> None:
    args = {"root": str(tmp_path), "image_size": 32}
    assert data.cache_path("imagefolder", args) != data.cache_path(
        "imagefolder", {**args, "on_bad_image": "skip"}
    )


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ({}, "give root"),
        ({"root": "/x", "train": "/y", "test": "/z"}, "give root"),
        ({"train": "/y"}, "give root"),
        ({"root": "/x", "on_bad_image": "ignore"}, "on_bad_image must be one of"),
        ({"root": "/x", "image_size": 4}, "image_size must be >= 8"),
    ],
)
def test_bad_arguments(args: dict, fragment: str) -> None:
    with pytest.raises(RegistryError, match=fragment):
        DATASETS.resolve_args("imagefolder", args)


def test_check_finds_a_missing_root_or_split_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=re.escape(f"no folder {tmp_path / 'none'}")) as info:
        check_source("imagefolder", {"root": str(tmp_path / "none")})
    assert info.value.field == "root"
    write_imagefolder(tmp_path)
    (tmp_path / "test").rename(tmp_path / "elsewhere")
    with pytest.raises(SourceError, match="must hold train/ and test/ .or val/.") as info:
        check_source("imagefolder", {"root": str(tmp_path)})
    assert info.value.field == "root"
    with pytest.raises(SourceError, match=re.escape(str(tmp_path / "missing"))) as info:
        check_source(
            "imagefolder", {"train": str(tmp_path / "train"), "test": str(tmp_path / "missing")}
        )
    assert info.value.field == "test"


def test_check_finds_an_empty_class_folder_and_differing_classes(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    (tmp_path / "test" / "eel").mkdir()
    (tmp_path / "test" / "eel" / "notes.txt").write_text("no image here")
    with pytest.raises(SourceError, match=re.escape(f"{tmp_path / 'test' / 'eel'} holds no image")):
        check_source("imagefolder", {"root": str(tmp_path)})
    (tmp_path / "test" / "eel" / "0.png").write_bytes(
        (tmp_path / "test" / "cat" / "00.png").read_bytes()
    )
    with pytest.raises(SourceError, match=r"only in train: \[\], only in test: \['eel'\]"):
        check_source("imagefolder", {"root": str(tmp_path)})


def test_check_does_not_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.data import images

    write_imagefolder(tmp_path)
    _corrupt(tmp_path)  # would fail a decode
    monkeypatch.setattr(images, "_rgb", lambda source: pytest.fail("decoded at validation"))
    check_source("imagefolder", {"root": str(tmp_path)})


# --------------------------------------------------------------------------- a trial


def test_a_trial_on_an_image_folder_records_its_data(tmp_path: Path, cache: Path) -> None:
    write_imagefolder(tmp_path / "images")
    _corrupt(tmp_path / "images")
    args = {"root": str(tmp_path / "images"), "image_size": 32, "on_bad_image": "skip"}
    spec = TrialSpec(
        backbone="vit_test",
        method="full",
        dataset="imagefolder",
        dataset_args=DATASETS.resolve_args("imagefolder", args),
        train=TrainConfig(epochs=1, batch_size=4, max_steps=2),
    )
    record = run_trial(spec, num_threads=1)
    assert record.status == "ok", record.error
    assert record.data_source == "decoded" and record.train_images == 12
    assert record.data_skipped_images == 1 and 0.0 <= record.accuracy <= 1.0
