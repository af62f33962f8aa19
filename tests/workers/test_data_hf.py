"""hf: Hugging Face datasets saved here with save_to_disk, read through the registry."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.spec import TrainConfig, TrialSpec
from tests.dataset_files import write_hf
from workers import data
from workers.data import DATASETS, ImageData, SourceError, check_source
from workers.registry import RegistryError
from workers.trial import run_trial

CLASSES = ("cat", "dog", "sea lion")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    data.clear_process_cache()
    yield tmp_path / "cache"
    data.clear_process_cache()


def load(**args: object) -> ImageData:
    return DATASETS.build("hf", args)


def assert_holds(x: torch.Tensor, y: torch.Tensor, expected: tuple[list, list]) -> None:
    labels, pixels = expected
    assert y.tolist() == labels and x.shape == (len(labels), 3, 32, 32)
    for img, want in zip(x, pixels, strict=True):  # stored as PNG: lossless
        assert np.array_equal(img.permute(1, 2, 0).numpy(), want)


@pytest.mark.parametrize("label_names", [True, False], ids=["classlabel", "strings"])
def test_reads_images_labels_and_class_names(tmp_path: Path, label_names: bool) -> None:
    expected = write_hf(tmp_path / "ds", label_names=label_names)
    got = load(path=str(tmp_path / "ds"), image_size=32)
    assert got.classes == CLASSES and got.num_classes == 3 and got.skipped == ()
    assert_holds(got.train_x, got.train_y, expected["train"])
    assert_holds(got.test_x, got.test_y, expected["test"])


def test_other_columns_and_splits(tmp_path: Path) -> None:
    import datasets

    write_hf(tmp_path / "ds")
    saved = datasets.load_from_disk(str(tmp_path / "ds"))
    renamed = datasets.DatasetDict(
        fit=saved["train"].rename_columns({"image": "img", "label": "fine"}),
        validation=saved["test"].rename_columns({"image": "img", "label": "fine"}),
    )
    renamed.save_to_disk(str(tmp_path / "renamed"))
    args = dict(image_column="img", label_column="fine", train_split="fit")
    got = load(path=str(tmp_path / "renamed"), test_split="validation", image_size=32, **args)
    assert (len(got.train_y), len(got.test_y)) == (12, 6) and got.classes == CLASSES


def test_data_options_apply_and_the_cache_is_used(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_hf(tmp_path / "ds")
    args = {"path": str(tmp_path / "ds"), "image_size": 32, "per_class": 1, "val_fraction": 0.5}
    got = data.load_dataset("hf", args)
    # per class: 4 training images, 2 held out for validation, 1 of the rest kept
    assert sorted(got.train_y.tolist()) == [0, 1, 2]
    assert sorted(got.val_y.tolist()) == [0, 0, 1, 1, 2, 2]
    data.clear_process_cache()
    decoded = []
    real_build = DATASETS.build
    monkeypatch.setattr(DATASETS, "build", lambda *a, **k: decoded.append(a) or real_build(*a, **k))
    again, how = data.load_source("hf", args)
    assert how == "disk_cache" and decoded == [] and again.classes == CLASSES


def test_a_bad_image_fails_or_is_skipped_and_counted(tmp_path: Path) -> None:
    expected = write_hf(tmp_path / "ds", bad_row=True)
    where = re.escape(f"{tmp_path / 'ds'} train[12]")
    with pytest.raises(ValueError, match=where + r" cannot be decoded \(UnidentifiedImageError"):
        load(path=str(tmp_path / "ds"), image_size=32)
    got = load(path=str(tmp_path / "ds"), image_size=32, on_bad_image="skip")
    assert len(got.skipped) == 1 and re.match(where, got.skipped[0])
    assert_holds(got.train_x, got.train_y, expected["train"])


# --------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    ("args", "field", "fragment"),
    [
        (
            {"label_column": "fine"},
            "label_column",
            "has no column 'fine'; its columns: \\['image', 'label'\\]",
        ),
        ({"image_column": "label"}, "image_column", "holds ClassLabel.*not images"),
        (
            {"test_split": "validation"},
            "test_split",
            "has no split 'validation'; its splits: \\['test', 'train'\\]",
        ),
    ],
)
def test_check_reads_the_features_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: dict, field: str, fragment: str
) -> None:
    from workers.data import images

    write_hf(tmp_path / "ds", bad_row=True)
    monkeypatch.setattr(images, "_rgb", lambda source: pytest.fail("decoded at validation"))
    check_source("hf", {"path": str(tmp_path / "ds")})  # the bad row is not seen
    with pytest.raises(SourceError, match=fragment) as info:
        check_source("hf", {"path": str(tmp_path / "ds"), **args})
    assert info.value.field == field


def test_a_folder_that_is_no_saved_dataset_dict(tmp_path: Path) -> None:
    import datasets

    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="is not a dataset saved with save_to_disk"):
        check_source("hf", {"path": str(tmp_path / "empty")})
    write_hf(tmp_path / "ds")
    datasets.load_from_disk(str(tmp_path / "ds"))["train"].save_to_disk(str(tmp_path / "one"))
    with pytest.raises(SourceError, match="holds one split without a name"):
        check_source("hf", {"path": str(tmp_path / "one")})


def test_a_hub_id_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        SourceError, match="'someone/birds' is no local folder.*save_to_disk"
    ) as info:
        check_source("hf", {"path": "someone/birds"})
    assert info.value.field == "path"


def test_local_folders_key_the_cache_by_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_hf(tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    assert data.cache_path("hf", {"path": "ds"}) == data.cache_path(
        "hf", {"path": str(tmp_path / "ds")}
    )
    assert DATASETS.resolve_args("hf", {"path": "ds"})["path"] == "ds"  # as the grid says


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ({}, "path must not be empty"),
        ({"path": "x", "label_column": " "}, "label_column must not be empty"),
        ({"path": "x", "on_bad_image": "drop"}, "on_bad_image must be one of"),
    ],
)
def test_bad_arguments(args: dict, fragment: str) -> None:
    with pytest.raises(RegistryError, match=fragment):
        DATASETS.resolve_args("hf", args)


# --------------------------------------------------------------------------- a trial


def test_a_trial_on_a_saved_dataset_records_its_data(tmp_path: Path, cache: Path) -> None:
    write_hf(tmp_path / "ds", bad_row=True)
    args = {"path": str(tmp_path / "ds"), "image_size": 32, "on_bad_image": "skip"}
    spec = TrialSpec(
        backbone="vit_test",
        method="bitfit",
        dataset="hf",
        dataset_args=DATASETS.resolve_args("hf", args),
        train=TrainConfig(epochs=1, batch_size=4, max_steps=2),
    )
    record = run_trial(spec, num_threads=1)
    assert record.status == "ok", record.error
    assert record.data_source == "decoded" and record.train_images == 12
    assert record.data_skipped_images == 1 and 0.0 <= record.accuracy <= 1.0
