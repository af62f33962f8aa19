"""``imagefolder``: one's own images in torchvision's class-per-folder layout.

    root/train/<class>/<any name>.<any format Pillow reads>
    root/test/<class>/...        (or root/val/ when there is no test/)

or ``train:`` and ``test:`` naming the two folders directly. Class indices follow the
sorted folder names (both splits must have the same classes); the class names are
the folder names with ``_`` read as a space (for zero-shot prompts, as in ``dtd``).
Files that are not images by their suffix (a README, ``.DS_Store``) are ignored and
counted in the log; an image that cannot be decoded is a bad image (``on_bad_image``).

Example grid entry:
    datasets:
      imagefolder: {root: ~/data/my_birds, image_size: 224, on_bad_image: skip}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from workers.data.core import (
    DATASETS,
    DECODED,
    ImageData,
    SourceConfig,
    SourceError,
    absolute,
    check_image_size,
)
from workers.data.images import ImageDecoder, check_on_bad_image, image_extensions

log = logging.getLogger(__name__)

HELD_OUT = ("test", "val")  # the held-out sub-folder of root, the first present


@dataclass(frozen=True)
class ImageFolderConfig(SourceConfig):
    root: str = ""  # folder with train/ and test/ (or val/), each a folder per class
    train: str = ""  # or: the training folder itself (a folder per class), with test:
    test: str = ""  # the held-out folder (a folder per class), with train:
    image_size: int = 224  # stored resolution: shorter side resized to it, then centre-cropped
    on_bad_image: str = "fail"  # an image that cannot be decoded: fail | skip (counted)

    def __post_init__(self) -> None:
        super().__post_init__()
        paths = {"root": self.root, "train": self.train, "test": self.test}
        given = {k: v for k, v in paths.items() if v.strip()}
        if set(given) not in ({"root"}, {"train", "test"}):
            raise ValueError(
                "give root (a folder with train/ and test/ inside) or both train and test, "
                f"got {given or 'none'}"
            )
        check_image_size(self.image_size)
        check_on_bad_image(self.on_bad_image)

    def local_paths(self) -> dict[str, str]:
        paths = {"root": self.root, "train": self.train, "test": self.test}
        return {k: absolute(v) for k, v in paths.items() if v.strip()}

    def split_folders(self) -> dict[str, tuple[str, Path]]:
        """split -> (the argument that names it, its folder); SourceError if missing."""
        if not self.root.strip():
            return {
                split: (split, _existing(split, Path(value).expanduser()))
                for split, value in (("train", self.train), ("test", self.test))
            }
        root = _existing("root", Path(self.root).expanduser())
        held_out = next((root / h for h in HELD_OUT if (root / h).is_dir()), None)
        if not (root / "train").is_dir() or held_out is None:
            raise SourceError(
                "root",
                f"{root} must hold train/ and test/ (or val/), each with a folder per "
                f"class; it holds {sorted(p.name for p in root.iterdir())}",
            )
        return {"train": ("root", root / "train"), "test": ("root", held_out)}

    def check(self) -> None:
        """Both folders exist, hold the same class folders, and none of those is empty."""
        class_sets = {}
        for split, (field, folder) in self.split_folders().items():
            classes = _class_folders(field, folder)
            for cls in classes:
                if next(_image_files(folder / cls), None) is None:
                    raise SourceError(field, f"class folder {folder / cls} holds no image")
            class_sets[split] = classes
        if class_sets["train"] != class_sets["test"]:
            only_train = sorted(set(class_sets["train"]) - set(class_sets["test"]))
            only_test = sorted(set(class_sets["test"]) - set(class_sets["train"]))
            raise SourceError(
                "root" if self.root.strip() else "test",
                f"train and test must have the same class folders; only in train: "
                f"{only_train}, only in test: {only_test}",
            )


@DATASETS.register(config_cls=ImageFolderConfig, tags=(DECODED,))
def imagefolder(config: ImageFolderConfig) -> ImageData:
    """Images in class folders (torchvision's ImageFolder layout), any Pillow format."""
    config.check()
    folders = {split: folder for split, (_, folder) in config.split_folders().items()}
    classes = _class_folders("train", folders["train"])
    decoder = ImageDecoder("imagefolder", config.image_size, config.on_bad_image)
    loaded = []
    for folder in folders.values():
        samples = [
            (str(path), lambda path=path: path, label)
            for label, cls in enumerate(classes)
            for path in sorted(_image_files(folder / cls))
        ]
        _log_ignored(folder)
        loaded += decoder.stack(samples, len(samples))
    return ImageData.from_splits(
        *loaded, classes=[c.replace("_", " ") for c in classes], skipped=decoder.skipped
    )


def _existing(field: str, folder: Path) -> Path:
    if not folder.is_dir():
        raise SourceError(field, f"no folder {folder}")
    return folder


def _class_folders(field: str, folder: Path) -> list[str]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p))
    if not classes:
        raise SourceError(field, f"{folder} holds no class folder (one folder per class)")
    return classes


def _files(folder: Path) -> Iterator[Path]:
    """Visible files under ``folder`` and its sub-folders (links followed), sorted."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _image_files(folder: Path) -> Iterator[Path]:
    """The files under ``folder`` that are images by their suffix (Pillow's formats)."""
    suffixes = image_extensions()
    return (p for p in _files(folder) if p.suffix.lower() in suffixes)


def _log_ignored(folder: Path) -> None:
    """Say how many files are not images by their suffix (they are not read)."""
    suffixes = image_extensions()
    ignored = [p for p in _files(folder) if p.suffix.lower() not in suffixes]
    if ignored:
        log.warning(
            "imagefolder: %d files in %s are not images (by suffix), not read; e.g. %s",
            len(ignored),
            folder,
            ignored[0],
        )


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")
