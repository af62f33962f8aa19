"""``hf``: a Hugging Face ``datasets`` dataset with an image column and a label column.

``path`` is a folder written by ``DatasetDict.save_to_disk`` (read with
``datasets.load_from_disk``, offline) or a hub id such as ``user/name`` (read with
``datasets.load_dataset``, downloaded when online; an offline machine gets a grid
error saying how to give a local copy instead). The class names are the label
feature's (``ClassLabel.names``), else the sorted distinct labels; ``_`` reads as a
space, as in ``dtd``. Images are decoded here from their stored bytes, so that a bad
one is named and handled by ``on_bad_image``.

Example grid entry:
    datasets:
      hf: {path: ~/data/beans_saved, image_column: image, label_column: labels,
           test_split: validation, image_size: 224}
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.data.core import (
    DATASETS,
    DECODED,
    ImageData,
    SourceConfig,
    SourceError,
    absolute,
    check_image_size,
)
from workers.data.images import ImageDecoder, Sample, check_on_bad_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HfConfig(SourceConfig):
    path: str = ""  # a save_to_disk folder (~ is expanded) or a hub id (user/name)
    image_column: str = "image"  # an Image feature
    label_column: str = "label"  # a ClassLabel feature, or ints / strings
    train_split: str = "train"
    test_split: str = "test"  # the held-out split (e.g. validation when test has no labels)
    image_size: int = 224  # stored resolution: shorter side resized to it, then centre-cropped
    on_bad_image: str = "fail"  # an image that cannot be decoded: fail | skip (counted)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("path", "image_column", "label_column", "train_split", "test_split"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be empty")
        check_image_size(self.image_size)
        check_on_bad_image(self.on_bad_image)

    @property
    def folder(self) -> Path | None:
        """The local save_to_disk folder, or None for a hub id."""
        folder = Path(self.path).expanduser()
        return folder if folder.exists() else None

    def local_paths(self) -> dict[str, str]:
        return {"path": absolute(self.path)} if self.folder else {}

    def check(self) -> None:
        """Both splits exist and have both columns, the image column an Image feature:
        read from the saved dataset's features (or the hub's card), no image decoded."""
        import datasets

        features = _features(self)
        for field, split in (("train_split", self.train_split), ("test_split", self.test_split)):
            if split not in features:
                raise SourceError(
                    field, f"{self.path} has no split {split!r}; its splits: {sorted(features)}"
                )
            if features[split] is None:  # the hub did not say: checked when decoding
                continue
            for column_field in ("image_column", "label_column"):
                column = getattr(self, column_field)
                if column not in features[split]:
                    raise SourceError(
                        column_field,
                        f"split {split!r} of {self.path} has no column {column!r}; "
                        f"its columns: {sorted(features[split])}",
                    )
            image = features[split][self.image_column]
            if not isinstance(image, datasets.Image):
                raise SourceError(
                    "image_column",
                    f"column {self.image_column!r} of {self.path} holds {image}, not images "
                    "(a datasets.Image feature)",
                )


@DATASETS.register(config_cls=HfConfig, tags=(DECODED,))
def hf(config: HfConfig) -> ImageData:
    """A Hugging Face datasets dataset (save_to_disk folder or hub id), image + label."""
    config.check()
    splits = _open(config)
    train, test = splits[config.train_split], splits[config.test_split]
    classes, index = _classes(config, train, test)
    decoder = ImageDecoder("hf", config.image_size, config.on_bad_image)
    loaded = []
    for split, ds in ((config.train_split, train), (config.test_split, test)):
        loaded += decoder.stack(_samples(config, ds, split, index), len(ds))
    return ImageData.from_splits(
        *loaded, classes=[c.replace("_", " ") for c in classes], skipped=decoder.skipped
    )


def _features(config: HfConfig) -> dict[str, Any]:
    """split -> its features (None where the hub's card does not list them)."""
    import datasets

    if config.folder is not None:
        saved = _open(config)
        return {name: split.features for name, split in saved.items()}
    try:
        info = datasets.load_dataset_builder(config.path).info
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, private: all named below
        raise SourceError(
            "path",
            f"{config.path!r} is no local folder, and the Hugging Face hub cannot give it "
            f"({type(exc).__name__}: {exc}). On an offline machine, save the dataset with "
            "`save_to_disk` where it is online and give that folder as `path`.",
        ) from None
    names = list(info.splits or ()) or [config.train_split, config.test_split]
    return {name: info.features for name in names}


def _open(config: HfConfig) -> Any:
    """The dataset's splits (a DatasetDict), read from disk or the hub."""
    import datasets

    if config.folder is None:
        return datasets.load_dataset(config.path)
    try:
        saved = datasets.load_from_disk(str(config.folder))
    except Exception as exc:  # noqa: BLE001 - whatever the folder holds, named below
        raise SourceError(
            "path", f"{config.folder} is not a dataset saved with save_to_disk ({exc})"
        ) from None
    if not isinstance(saved, datasets.DatasetDict):
        raise SourceError(
            "path",
            f"{config.folder} holds one split without a name; save a DatasetDict with "
            f"{config.train_split!r} and {config.test_split!r} splits",
        )
    return saved


def _classes(config: HfConfig, train: Any, test: Any) -> tuple[list[str], dict[Any, int]]:
    """Class names and label value -> class index, shared by both splits."""
    import datasets

    feature = train.features[config.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), {i: i for i in range(feature.num_classes)}
    values = sorted(set(train.unique(config.label_column)) | set(test.unique(config.label_column)))
    return [str(v) for v in values], {v: i for i, v in enumerate(values)}


def _samples(config: HfConfig, ds: Any, split: str, index: dict[Any, int]) -> Iterator[Sample]:
    """The split's images as encoded bytes (or their file), named by split and row."""
    import datasets

    labels = list(ds[config.label_column])
    images = ds.select_columns([config.image_column]).cast_column(
        config.image_column, datasets.Image(decode=False)
    )
    for i, (row, label) in enumerate(zip(images, labels, strict=True)):
        if label not in index:
            raise ValueError(
                f"hf {config.path} split {split!r} row {i}: label {label!r} is not a class "
                f"(an unlabelled split? choose another test_split)"
            )
        image = row[config.image_column] or {}
        name = f"{config.path} {split}[{i}]" + (f" ({image['path']})" if image.get("path") else "")
        yield name, lambda image=image: _encoded(image), index[label]


def _encoded(image: dict[str, Any]) -> bytes | str:
    """An undecoded Image value's bytes, else its file; a row without either is bad."""
    if image.get("bytes") or image.get("path"):
        return image.get("bytes") or image["path"]
    raise ValueError("the row holds no image")
