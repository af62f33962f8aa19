"""The dataset registry and the two values it deals in: ``ImageData`` and ``DataOptions``.

A source (one module of this package each) registers a builder that decodes a whole
dataset into ``ImageData``: uint8 tensors (N, 3, H, W) at a stored resolution, its
official train/test split, class names and normalisation statistics. Its config
dataclass derives from ``SourceConfig``: the ``DataOptions`` every dataset takes
(which decoded images a trial uses, how its batches are augmented), then the
source's own arguments (where its files are, the stored resolution), which alone
decide the decoded tensors (``source_args``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.registry import Registry

log = logging.getLogger(__name__)

DATASETS = Registry("dataset")

# Where the file-based sources look for their files unless the grid gives ``root:``.
DEFAULT_ROOT = "~/.cache/vramsweep/data"

# The split of a dataset without an official one is fixed (not the trial's seed): all
# trials of a sweep, whatever their seed, are evaluated on the same held-out images.
SPLIT_SEED = 0

# Sources registered with this tag decode slowly enough (image files, pickles) to be
# kept on disk, decoded, for the next sweep (see ``workers.data.cache``).
DECODED = "decoded"


class SourceError(ValueError):
    """A dataset argument that names no usable data (a missing folder, an absent
    column); ``field`` is the argument, so that a grid error can point at it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# --------------------------------------------------------------------------- ImageData


@dataclass
class ImageData:
    """Train, held-out test and (optional) validation split as uint8 tensors, plus what
    is needed to feed them."""

    train_x: torch.Tensor  # (N, 3, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, float, float]  # per-channel, of the [0, 1] training images
    std: tuple[float, float, float]
    val_x: torch.Tensor | None = None  # held out of train by DataOptions.val_fraction
    val_y: torch.Tensor | None = None
    classes: tuple[str, ...] = ()  # class names in label order (zero-shot prompts need them)
    # images the decode could not read and left out (``on_bad_image: skip``), each
    # "file: reason"; the trial's record counts them
    skipped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.val_x is None) != (self.val_y is None):
            raise ValueError("val_x and val_y must be given together")
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for {self.num_classes} classes")
        for name in ("train_x", "test_x", "val_x"):
            x = getattr(self, name)
            if x is not None and (x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3):
                raise ValueError(
                    f"{name} must be uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}"
                )
        pairs = [(self.train_x, self.train_y), (self.test_x, self.test_y)]
        if self.val_x is not None:
            pairs.append((self.val_x, self.val_y))
        if any(len(x) != len(y) for x, y in pairs):
            raise ValueError("images and labels differ in length")

    @classmethod
    def from_splits(
        cls,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        classes: Sequence[str],
        skipped: Sequence[str] = (),
    ) -> ImageData:
        """ImageData whose normalisation statistics come from the train split only."""
        # float64 sums over chunks: exact enough for 50k images without a float copy of all
        n_pixels = train_x.shape[0] * train_x.shape[2] * train_x.shape[3]
        total = torch.zeros(3, dtype=torch.float64)
        total_sq = torch.zeros(3, dtype=torch.float64)
        for chunk in train_x.split(4096):
            f = chunk.double().div(255.0)
            total += f.sum(dim=(0, 2, 3))
            total_sq += f.square().sum(dim=(0, 2, 3))
        mean = total / n_pixels
        var = (total_sq - n_pixels * mean.square()) / max(n_pixels - 1, 1)  # unbiased
        std = var.clamp_min(0).sqrt().clamp_min(1e-3)
        return cls(
            train_x,
            train_y,
            test_x,
            test_y,
            num_classes=len(classes),
            mean=tuple(mean.tolist()),
            std=tuple(std.tolist()),
            classes=tuple(classes),
            skipped=tuple(skipped),
        )

    @property
    def nbytes(self) -> int:
        tensors = [self.train_x, self.train_y, self.test_x, self.test_y, self.val_x, self.val_y]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device) -> ImageData:
        """A copy whose tensors live on ``device`` (the same object if they already do)."""
        if self.train_x.device == device:
            return self
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self._fields()}
        return ImageData(**moved)

    def state(self) -> dict[str, Any]:
        """The fields as a plain dict (tensors, numbers, lists of str): what the decode
        cache saves and, with numpy arrays for tensors, the object store keeps."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._fields()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ImageData:
        """Inverse of ``state``; a state saved before a field existed gets its default."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in state.items()})

    def _fields(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class DataOptions:
    """Arguments every dataset takes beside its own: which decoded images a trial uses
    and how its training batches are augmented. They are not part of the decode key."""

    fraction: float = 1.0  # stratified share of the training images kept (quick sweeps)
    per_class: int = 0  # or: at most this many training images per class (0 = no cap)
    val_fraction: float = 0.0  # stratified share of the training split held out for validation
    split_seed: int = 0  # fixes the validation split and the subset, whatever the trial's seed
    augment: bool = False  # random-resized crop (+ flip) of every training batch
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area share of the crop (torchvision's)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the crop
    flip: bool = True  # horizontal flip with probability 1/2 (with augment)
    resident: str = "auto"  # whole dataset on the trial's device: auto | always | never

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.per_class < 0:
            raise ValueError(f"per_class must be >= 0 (0 = all), got {self.per_class}")
        if self.per_class and self.fraction < 1.0:
            raise ValueError("give fraction or per_class, not both")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        lo, hi = pair(self.crop_scale, "crop_scale")
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        lo, hi = pair(self.crop_ratio, "crop_ratio")
        if not 0.0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        if self.resident not in RESIDENCY:
            raise ValueError(f"resident must be one of {list(RESIDENCY)}, got {self.resident!r}")


RESIDENCY = ("auto", "always", "never")
OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(DataOptions))
# ``resident: auto`` keeps a dataset on a CUDA device when it takes at most this share
# of the trial's memory budget (the rest is the model's): 1/8 keeps CIFAR-100 at 32 px
# (150 MiB) resident under a 2 GiB budget and DTD at 224 px (850 MiB) on the host.
RESIDENT_BUDGET_SHARE = 1 / 8


@dataclass(frozen=True)
class SourceConfig(DataOptions):
    """Base of every source's config: the data options, then (in the subclass) the
    source's own arguments. Two hooks a source may override.

    A field added to an existing source after records existed goes in the subclass's
    ``LATER_FIELDS`` (see ``Registry.resolve_args``), so old trial ids hold.
    """

    def check(self) -> None:
        """Cheap checks of the arguments against the file system (folders exist, a
        column is there), run by grid validation before any trial and by the builder;
        never decodes. Raises ``SourceError``."""

    def local_paths(self) -> dict[str, Any]:
        """The arguments that name local files or folders, made absolute: the decode
        cache's key must not depend on the working folder."""
        return {}


def pair(value: Any, name: str) -> tuple[float, float]:
    """``value`` as a (low, high) pair of floats; a ValueError naming ``name`` if not."""
    if len(value) != 2 or not all(isinstance(v, int | float) for v in value):
        raise ValueError(f"{name} must be two numbers [low, high], got {value!r}")
    return float(value[0]), float(value[1])


# The largest stored resolution a grid may ask for: 4096 px already makes one image of
# 50 MB; larger sizes are typos that would take the node's memory down.
MAX_IMAGE_SIZE = 4096


def check_image_size(image_size: int, least: int = 8) -> None:
    if image_size < least:
        raise ValueError(f"image_size must be >= {least}, got {image_size}")
    if image_size > MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be at most {MAX_IMAGE_SIZE}, got {image_size}")


def check_folder_arg(name: str, value: str) -> None:
    if not value.strip():
        raise ValueError(f"{name} must be a folder path, got an empty string")


def absolute(path: str) -> str:
    """``path`` with ``~`` expanded, made absolute (whether or not it exists yet)."""
    return str(Path(path).expanduser().resolve())


# --------------------------------------------------------------------------- arguments


def data_options(name: str, args: dict[str, Any] | None) -> DataOptions:
    """The ``DataOptions`` part of dataset ``name``'s grid arguments, validated."""
    config = DATASETS.make_config(name, args)
    return DataOptions(**{f: getattr(config, f) for f in OPTION_FIELDS})


def source_args(name: str, args: dict[str, Any] | None) -> dict[str, Any]:
    """The arguments that decide the decoded tensors (every argument but the options)."""
    resolved = DATASETS.resolve_args(name, args)
    return {k: v for k, v in resolved.items() if k not in OPTION_FIELDS}


def check_source(name: str, args: dict[str, Any] | None) -> None:
    """Check dataset ``name``'s files before any trial (see ``SourceConfig.check``; a
    plug-in's config that derives ``DataOptions`` alone has no checks)."""
    config = DATASETS.make_config(name, args)
    if isinstance(config, SourceConfig):
        config.check()


def resident_on(
    device: torch.device, options: DataOptions, data: ImageData, budget_mb: float
) -> bool:
    """Whether the whole dataset should live on ``device`` for a trial (no copy per batch)."""
    if device.type == "cpu" or options.resident == "never":
        return False
    if options.resident == "always":
        return True
    return data.nbytes <= budget_mb * 1024 * 1024 * RESIDENT_BUDGET_SHARE
