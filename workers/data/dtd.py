"""``dtd``: the Describable Textures Dataset (47 classes) from its official files.

Train is the official train + val list of the chosen split (a grid asks for its own
validation split with ``val_fraction``); test is the official test list.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from workers.data.core import (
    DATASETS,
    DECODED,
    DEFAULT_ROOT,
    ImageData,
    SourceConfig,
    absolute,
    check_folder_arg,
    check_image_size,
)
from workers.data.images import ImageDecoder, Sample, check_on_bad_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DtdConfig(SourceConfig):
    root: str = DEFAULT_ROOT  # folder that holds dtd/ (~ is expanded)
    split: int = 1  # which of the 10 official splits (labels/{train,val,test}<split>.txt)
    image_size: int = 224  # stored resolution: shorter side resized to it, then centre-cropped
    download: bool = False  # fetch with torchvision when dtd/ is missing
    on_bad_image: str = "fail"  # a listed image that cannot be decoded: fail | skip (counted)

    LATER_FIELDS: ClassVar[tuple[str, ...]] = ("on_bad_image",)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_folder_arg("root", self.root)
        check_image_size(self.image_size)
        if not 1 <= self.split <= 10:
            raise ValueError(f"split must be in 1..10, got {self.split}")
        check_on_bad_image(self.on_bad_image)

    def local_paths(self) -> dict[str, str]:
        return {"root": absolute(self.root)}


@DATASETS.register(config_cls=DtdConfig, tags=(DECODED,))
def dtd(config: DtdConfig) -> ImageData:
    """Describable Textures (47 classes); train = official train + val, test = test."""
    root = Path(config.root).expanduser()
    folder = _folder(root)
    if folder is None and config.download:
        import torchvision

        log.info("downloading DTD to %s", root)
        torchvision.datasets.DTD(str(root), download=True)
        folder = _folder(root)
    if folder is None:
        raise FileNotFoundError(
            f"DTD not found: no {root / 'dtd' / 'images'} with labels/ beside it. Give the "
            "folder that contains dtd/ as `root:` under the dataset in the grid, or set "
            "`download: true` on a machine that is online."
        )
    classes = sorted(p.name for p in (folder / "images").iterdir() if p.is_dir())
    k = config.split
    parts = {
        "train": _list(folder, f"train{k}.txt") + _list(folder, f"val{k}.txt"),
        "test": _list(folder, f"test{k}.txt"),
    }
    decoder = ImageDecoder("DTD", config.image_size, config.on_bad_image)
    loaded = []
    for part, entries in parts.items():
        if not entries:
            raise ValueError(f"DTD split {k}: the {part} list is empty")
        loaded += decoder.stack(_samples(folder, entries, classes), len(entries))
    return ImageData.from_splits(
        *loaded, classes=[c.replace("_", " ") for c in classes], skipped=decoder.skipped
    )


def _folder(root: Path) -> Path | None:
    """The folder with images/ and labels/: the official tarball's or torchvision's."""
    for folder in (root / "dtd", root / "dtd" / "dtd"):  # torchvision nests it once more
        if (folder / "images").is_dir() and (folder / "labels").is_dir():
            return folder
    return None


def _list(folder: Path, name: str) -> list[str]:
    path = folder / "labels" / name
    if not path.is_file():
        raise FileNotFoundError(f"DTD label file missing: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _samples(folder: Path, entries: list[str], classes: list[str]) -> list[Sample]:
    """The listed images; an entry whose class has no folder fails before any decode."""
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for entry in entries:
        cls = entry.split("/", 1)[0]
        if cls not in index:
            raise ValueError(
                f"DTD label entry {entry!r} names class {cls!r}, which has no folder "
                f"in {folder / 'images'}"
            )
        path = folder / "images" / entry
        samples.append((str(path), lambda path=path: path, index[cls]))
    return samples
