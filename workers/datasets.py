"""Dataset registry: whole datasets as uint8 tensors, batches made with tensor ops.

A dataset is decoded once into ``uint8`` tensors of shape (N, 3, H, W) at a stored
resolution; batches are cut from them on the trial's device, converted, resized to
the backbone's input size and normalised in one batched call (no per-image Python).

``digits`` (scikit-learn's bundled 8x8 digits) is the offline default;
``synthetic`` is generated and exists for tests and overhead measurements;
``cifar100`` and ``dtd`` read the official files from a local folder (``root:`` in
the grid) and fetch them with torchvision only when asked to (``download: true``).

Every dataset also takes the ``DataOptions`` arguments: which of the decoded images a
trial uses (a stratified subset, a validation split) and how its training batches are
augmented (a seeded random-resized crop and flip, drawn for the whole batch at once).
They never change the decoded tensors, so one decoded copy (on disk, in a worker's
memory, or in the Ray object store) serves every trial of a sweep.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pickle
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from workers.registry import Registry

log = logging.getLogger(__name__)

DATASETS = Registry("dataset")

# Where cifar100 and dtd look for their files unless the grid gives ``root:``.
DEFAULT_ROOT = "~/.cache/vramsweep/data"

# The split of every dataset is fixed (not the trial's seed): all trials of a sweep,
# whatever their seed, are evaluated on the same held-out images.
SPLIT_SEED = 0


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

    @property
    def nbytes(self) -> int:
        tensors = [self.train_x, self.train_y, self.test_x, self.test_y, self.val_x, self.val_y]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device) -> ImageData:
        """A copy whose tensors live on ``device`` (the same object if they already do)."""
        if self.train_x.device == device:
            return self
        moved = {
            f.name: v.to(device) if isinstance(v, torch.Tensor) else v
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return ImageData(**moved)


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
        lo, hi = _pair(self.crop_scale, "crop_scale")
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        lo, hi = _pair(self.crop_ratio, "crop_ratio")
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


def _pair(value: Any, name: str) -> tuple[float, float]:
    if len(value) != 2 or not all(isinstance(v, int | float) for v in value):
        raise ValueError(f"{name} must be two numbers [low, high], got {value!r}")
    return float(value[0]), float(value[1])


def data_options(name: str, args: dict[str, Any] | None) -> DataOptions:
    """The ``DataOptions`` part of dataset ``name``'s grid arguments, validated."""
    config = DATASETS.make_config(name, args)
    return DataOptions(**{f: getattr(config, f) for f in OPTION_FIELDS})


def source_args(name: str, args: dict[str, Any] | None) -> dict[str, Any]:
    """The arguments that decide the decoded tensors (every argument but the options)."""
    resolved = DATASETS.resolve_args(name, args)
    return {k: v for k, v in resolved.items() if k not in OPTION_FIELDS}


def resident_on(
    device: torch.device, options: DataOptions, data: ImageData, budget_mb: float
) -> bool:
    """Whether the whole dataset should live on ``device`` for a trial (no copy per batch)."""
    if device.type == "cpu" or options.resident == "never":
        return False
    if options.resident == "always":
        return True
    return data.nbytes <= budget_mb * 1024 * 1024 * RESIDENT_BUDGET_SHARE


# --------------------------------------------------------------------------- loading


def load_dataset(name: str, args: dict | None) -> ImageData:
    """Load registered dataset ``name`` with grid arguments ``args``: the decoded source
    (see ``load_source``), then the subset and validation split of its options."""
    return select(load_source(name, args)[0], data_options(name, args))


def load_source(name: str, args: dict | None) -> tuple[ImageData, str]:
    """The decoded dataset (all images, official splits) and where it came from:
    ``decoded`` (built now), ``disk_cache`` (a decoded copy on disk) or ``process_cache``.

    A worker process that runs several trials decodes each dataset once (the last two
    are kept); callers must not modify the returned tensors in place.
    """
    key = json.dumps(source_args(name, args), sort_keys=True)
    hits = _load_cached.cache_info().hits
    data, how = _load_cached(name, key)
    return data, ("process_cache" if _load_cached.cache_info().hits > hits else how)


# Datasets registered with this tag decode slowly enough (JPEGs, pickles) to be kept
# on disk, decoded, for the next sweep.
DECODED = "decoded"
CACHE_ENV = "VRAMSWEEP_CACHE"  # folder of decoded datasets (default below)
CACHE_FORMAT = 2  # bump when the decoded layout changes: old files are then ignored


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/vramsweep/decoded")).expanduser()


def cache_path(name: str, args: dict[str, Any]) -> Path:
    """Where dataset ``name`` decoded with ``args`` is kept: keyed by the dataset and
    every argument that changes the tensors (source folder, split, resolution)."""
    key_args = {k: v for k, v in source_args(name, args).items() if k != "download"}
    if "root" in key_args:
        key_args["root"] = str(Path(key_args["root"]).expanduser().resolve())
    key = json.dumps({"dataset": name, "args": key_args, "format": CACHE_FORMAT}, sort_keys=True)
    return cache_dir() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _from_disk_cache(name: str, args: dict[str, Any]) -> tuple[ImageData, str]:
    path = cache_path(name, args)
    if path.is_file():
        try:
            data = _from_state(torch.load(path, map_location="cpu", weights_only=True))
            log.info("dataset %s: decoded copy read from %s", name, path)
            return data, "disk_cache"
        except Exception as exc:  # noqa: BLE001 - a bad cache file is decoded again
            log.warning("dataset %s: ignoring unreadable cache %s (%s)", name, path, exc)
    data = DATASETS.build(name, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(_state(data), tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
    log.info("dataset %s: decoded copy written to %s", name, path)
    return data, "decoded"


@functools.lru_cache(maxsize=2)
def _load_cached(name: str, args_json: str) -> tuple[ImageData, str]:
    args = json.loads(args_json)
    if DECODED in DATASETS.get(name).tags:
        data, how = _from_disk_cache(name, args)
    else:
        data, how = DATASETS.build(name, args), "decoded"
    log.info(
        "dataset %s: %d train / %d test images, %d classes, stored at %d px",
        name,
        len(data.train_y),
        len(data.test_y),
        data.num_classes,
        data.train_x.shape[-1],
    )
    return data, how


def select(data: ImageData, options: DataOptions) -> ImageData:
    """The images a trial uses: a stratified validation split held out of train (fixed
    by ``split_seed``; never overlaps train), then a stratified subset of what is left.
    The test split is never subset. Without either, ``data`` itself (no copy)."""
    subset = options.fraction < 1.0 or options.per_class > 0
    if not options.val_fraction and not subset:
        return data
    labels = data.train_y.cpu().numpy()
    rng = np.random.default_rng(options.split_seed)
    keep = np.arange(len(labels))
    val_idx = None
    if options.val_fraction:
        share = options.val_fraction
        # every class keeps at least one training image
        val_idx, keep = _per_class_pick(labels, lambda n: min(n - 1, max(1, round(n * share))), rng)
    if subset:
        cap, share = options.per_class, options.fraction
        count = (lambda n: min(n, cap)) if cap else (lambda n: max(1, round(n * share)))
        picked, _ = _per_class_pick(labels[keep], count, rng)
        keep = keep[picked]
    if val_idx is not None and not len(val_idx):
        raise ValueError(f"val_fraction={options.val_fraction} leaves no validation image")
    train = torch.from_numpy(keep).to(data.train_x.device)
    val = torch.from_numpy(val_idx).to(data.train_x.device) if val_idx is not None else None
    return dataclasses.replace(
        data,
        train_x=data.train_x[train],
        train_y=data.train_y[train],
        val_x=data.train_x[val] if val is not None else data.val_x,
        val_y=data.train_y[val] if val is not None else data.val_y,
    )


def _per_class_pick(
    labels: np.ndarray, count: Callable[[int], int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, ``count(n)`` indices drawn at random and the rest; both sorted."""
    picked, rest = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        k = count(len(idx))
        picked.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(picked)), np.sort(np.concatenate(rest))


# --------------------------------------------------------------------------- sharing


def shared_key(name: str, args: dict[str, Any] | None) -> str:
    """Names one decoded dataset among those a sweep shares (dataset + source arguments)."""
    return json.dumps({"dataset": name, "args": source_args(name, args)}, sort_keys=True)


def _state(data: ImageData) -> dict[str, Any]:
    """The fields of ``data`` as a plain dict (tensors, numbers, lists of str)."""
    return {
        f.name: list(v) if isinstance(v, tuple) else v
        for f in dataclasses.fields(data)
        for v in [getattr(data, f.name)]
    }


def _from_state(state: dict[str, Any]) -> ImageData:
    """Inverse of ``_state`` (and of ``to_shared`` once its arrays are tensors)."""
    return ImageData(
        **{k: tuple(v) if k in ("mean", "std", "classes") else v for k, v in state.items()}
    )


def to_shared(data: ImageData) -> dict[str, Any]:
    """``data`` as plain numpy arrays and numbers, the form the Ray object store keeps
    out of band: every process of a node that gets it maps the same memory."""
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in _state(data).items()}


def from_shared(obj: dict[str, Any]) -> ImageData:
    """``ImageData`` over the arrays of ``to_shared`` without copying them. Arrays from
    the object store are read-only; nothing here writes into a dataset's tensors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return _from_state(
            {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in obj.items()}
        )


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Augment:
    """A random-resized crop (area share and aspect ratio ranges) and a horizontal flip."""

    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip: bool

    @classmethod
    def of(cls, options: DataOptions) -> Augment | None:
        """The augmentation ``options`` ask for; None when they ask for none."""
        if not options.augment:
            return None
        return cls(
            _pair(options.crop_scale, "crop_scale"),
            _pair(options.crop_ratio, "crop_ratio"),
            options.flip,
        )


def crop_transforms(n: int, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) affine maps from output to input coordinates, one random crop each.

    The crop's area share is uniform in ``scale`` and its aspect ratio log-uniform in
    ``ratio`` (torchvision's ``RandomResizedCrop``); a crop that would not fit is
    clipped to the image where torchvision redraws it. A flip negates the x scale.
    """
    area = torch.empty(n).uniform_(*augment.scale, generator=generator)
    log_ratio = torch.empty(n).uniform_(*map(math.log, augment.ratio), generator=generator)
    ratio = log_ratio.exp()
    width = (area * ratio).sqrt().clamp_(max=1.0)  # as shares of the image's side
    height = (area / ratio).sqrt().clamp_(max=1.0)
    centre_x = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    centre_y = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    sign = torch.ones(n)
    if augment.flip:
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = width * sign
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    return theta


def resample(
    x: torch.Tensor, theta: torch.Tensor, size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Bilinear samples of ``x`` (B, C, H, W) at ``size`` x ``size`` points mapped by the
    axis-aligned affine maps ``theta`` (B, 2, 3), as ``grid_sample`` with border padding,
    returned as ``dtype``.

    A map without rotation is separable: per image, out = Ry @ x @ Rx^T with two
    interpolation matrices. From a small stored image (CIFAR's 32 px to 224 px) those
    two batched matmuls cost less than ``grid_sample``'s per-pixel grid, and a bf16
    batch (a bf16 trial's) comes from bf16 matmuls directly; from a large one their
    dense inner dimension costs more, and ``grid_sample`` is used.
    """
    height, width = x.shape[-2:]
    if max(height, width) * 2 > size:
        grid = F.affine_grid(theta, [len(x), x.shape[1], size, size], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.to(dtype)
    rows = _interpolation_matrix(theta[:, 1, 1], theta[:, 1, 2], height, size).to(dtype)
    cols = _interpolation_matrix(theta[:, 0, 0], theta[:, 0, 2], width, size).to(dtype)
    return torch.matmul(torch.matmul(rows[:, None], x.to(dtype)), cols.transpose(1, 2)[:, None])


def _interpolation_matrix(
    scale: torch.Tensor, offset: torch.Tensor, n_in: int, n_out: int
) -> torch.Tensor:
    """(B, n_out, n_in) bilinear weights of output pixel centres mapped to the input by
    ``u -> scale * u + offset`` in [-1, 1] coordinates (``align_corners=False``)."""
    u = (2 * torch.arange(n_out, device=scale.device, dtype=scale.dtype) + 1) / n_out - 1
    pos = (((scale[:, None] * u + offset[:, None]) + 1) * n_in - 1) / 2
    pos = pos.clamp(0, n_in - 1)  # border padding
    lo = pos.floor().long().clamp_(max=n_in - 1)
    hi = (lo + 1).clamp_(max=n_in - 1)
    frac = (pos - lo)[..., None]
    weights = torch.zeros(len(scale), n_out, n_in, device=scale.device, dtype=scale.dtype)
    weights.scatter_add_(2, lo[..., None], 1 - frac)
    return weights.scatter_add_(2, hi[..., None], frac)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    device: torch.device,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    augment: Augment | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised ``dtype`` batches at ``size`` px; shuffled when ``generator`` is
    given.

    Every step is one batched tensor op on ``device``: gather, convert, normalise, resize
    (or, with ``augment``, crop + flip + resize in one ``resample`` whose random maps
    are drawn from ``generator``). ``x`` may already live on ``device``. A trial that
    computes in bf16 asks for bf16 batches: autocast would cast them at the first layer.
    """
    if augment is not None and generator is None:
        raise ValueError("augmented batches need a generator (their crops are seeded)")
    order = torch.randperm(len(y), generator=generator) if generator is not None else None
    if order is not None:
        order = order.to(x.device)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * std_t)  # uint8 -> [0, 1] -> standardised, in one multiply-add
    shift = -torch.tensor(mean, device=device).view(1, 3, 1, 1) / std_t
    stop = len(y) - (len(y) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = (
            order[start : start + batch_size]
            if order is not None
            else slice(start, start + batch_size)
        )
        # normalised at the stored resolution: resampling weights sum to 1, so this
        # equals normalising the (larger) output, at a fraction of the passes over it
        xb = torch.addcmul(shift, x[idx].to(device, non_blocking=True).float(), scale)
        if augment is not None:
            theta = crop_transforms(len(xb), augment, generator).to(device)  # type: ignore[arg-type]
            xb = resample(xb, theta, size, dtype)
        elif xb.shape[-2:] != (size, size):
            xb = F.interpolate(xb, size=(size, size), mode="bilinear", align_corners=False)
        yield xb.to(dtype), y[idx].to(device, non_blocking=True)


def _stratified_split(labels: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a per-class split with a fixed seed; disjoint by construction."""
    rng = np.random.default_rng(SPLIT_SEED)
    test, train = _per_class_pick(labels, lambda n: max(1, round(n * test_fraction)), rng)
    return train, test


def _from_arrays(
    images: np.ndarray, labels: np.ndarray, test_fraction: float, classes: Sequence[str]
) -> ImageData:
    """(N, 3, H, W) uint8 images + labels -> split ImageData with train-split statistics."""
    train_idx, test_idx = _stratified_split(labels, test_fraction)
    x = torch.from_numpy(np.ascontiguousarray(images))
    y = torch.from_numpy(labels.astype(np.int64))
    return _with_train_stats(x[train_idx], y[train_idx], x[test_idx], y[test_idx], classes)


def _with_train_stats(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    classes: Sequence[str],
) -> ImageData:
    """ImageData whose normalisation statistics come from the train split only."""
    # float64 sums over chunks: exact enough for 50k images without a float copy of them all
    n_pixels = train_x.shape[0] * train_x.shape[2] * train_x.shape[3]
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for chunk in train_x.split(4096):
        f = chunk.double().div(255.0)
        total += f.sum(dim=(0, 2, 3))
        total_sq += f.square().sum(dim=(0, 2, 3))
    mean = total / n_pixels
    var = (total_sq - n_pixels * mean.square()) / max(n_pixels - 1, 1)  # unbiased, as torch.std
    std = var.clamp_min(0).sqrt().clamp_min(1e-3)
    return ImageData(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes=len(classes),
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        classes=tuple(classes),
    )


def _resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, 3, H, W) uint8 images to size x size once, antialiased, in chunks."""
    if x.shape[-2:] == (size, size):
        return x
    out = torch.empty(len(x), 3, size, size, dtype=torch.uint8)
    for start in range(0, len(x), 4096):  # bounds the float copy to ~50 MB at 32 px
        f = x[start : start + 4096].float()
        f = F.interpolate(
            f, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[start : start + len(f)] = f.round_().clamp_(0, 255).to(torch.uint8)
    return out


@dataclass(frozen=True)
class DigitsConfig(DataOptions):
    image_size: int = 32  # stored resolution (the 8x8 originals are upsampled once)
    test_fraction: float = 0.2  # held-out share of each class

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


@DATASETS.register(config_cls=DigitsConfig)
def digits(config: DigitsConfig) -> ImageData:
    """scikit-learn's bundled handwritten digits: 1797 images, 10 classes, offline."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    gray = F.interpolate(gray, size=(config.image_size,) * 2, mode="bilinear", align_corners=False)
    images = (gray.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    return _from_arrays(
        images.numpy(), bunch.target, config.test_fraction, [str(d) for d in range(10)]
    )


@dataclass(frozen=True)
class SyntheticConfig(DataOptions):
    num_classes: int = 4
    images_per_class: int = 64  # generated per class, before the split
    image_size: int = 16
    test_fraction: float = 0.25
    noise: float = 0.25  # std of the Gaussian pixel noise, in [0, 1] units

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes < 2 or self.images_per_class < 2 or self.image_size < 4:
            raise ValueError(
                "synthetic needs num_classes >= 2, images_per_class >= 2, image_size >= 4"
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


@DATASETS.register(config_cls=SyntheticConfig)
def synthetic(config: SyntheticConfig) -> ImageData:
    """Generated stripes: class k has its own orientation and colour (tests only)."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    n, s = config.num_classes * config.images_per_class, config.image_size
    labels = torch.arange(config.num_classes).repeat_interleave(config.images_per_class)
    angle = labels.float() * torch.pi / config.num_classes
    coords = torch.linspace(-1, 1, s)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    phase = torch.rand(n, 1, 1, generator=gen) * 2 * torch.pi
    wave = torch.sin(
        3 * torch.pi * (xx * angle.cos().view(-1, 1, 1) + yy * angle.sin().view(-1, 1, 1)) + phase
    )
    colour = torch.stack([(labels + c) % 3 == 0 for c in range(3)], 1).float() * 0.5 + 0.25
    img = 0.5 + 0.5 * wave.unsqueeze(1) * colour.view(n, 3, 1, 1)
    img = img + config.noise * torch.randn(n, 3, s, s, generator=gen)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    classes = [f"class {k}" for k in range(config.num_classes)]
    return _from_arrays(images.numpy(), labels.numpy(), config.test_fraction, classes)


# --------------------------------------------------------------------------- files on disk


def _root_path(root: str) -> Path:
    return Path(root).expanduser()


def _check_root_and_size(root: str, image_size: int) -> None:
    if not root.strip():
        raise ValueError("root must be a folder path, got an empty string")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")


def _numpy_pickle_globals() -> dict[tuple[str, str], Callable[..., Any] | type]:
    """The few numpy callables that rebuild a plain array (old and new module paths)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    allowed: dict[tuple[str, str], Callable[..., Any] | type] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, str, ints and plain numpy arrays; nothing else.

    A pickle can name any importable callable (``os.system``); only the globals that
    rebuild the official CIFAR files are resolved, every other one is refused.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):  # bytes in protocol-2 pickles
            import codecs

            return codecs.encode
        found = _numpy_pickle_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return found


def _load_plain_pickle(path: Path) -> dict[Any, Any]:
    try:
        with path.open("rb") as f:
            # encoding="bytes": the official files were written by Python 2
            obj = _PlainDataUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated, corrupt or hostile: all a bad file to the user
        raise ValueError(f"{path}: not a readable dataset pickle ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _key(entry: dict[Any, Any], key: str, path: Path) -> Any:
    """``entry[b'key']`` (Python 2 files) or ``entry['key']`` (Python 3 copies)."""
    for k in (key.encode(), key):
        if k in entry:
            return entry[k]
    raise ValueError(f"{path}: missing key {key!r}")


# --------------------------------------------------------------------------- CIFAR-100


@dataclass(frozen=True)
class Cifar100Config(DataOptions):
    root: str = DEFAULT_ROOT  # folder that holds cifar-100-python/ (~ is expanded)
    download: bool = False  # fetch with torchvision when cifar-100-python/ is missing
    image_size: int = 32  # stored resolution; the 32 px originals are resized once if different

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_root_and_size(self.root, self.image_size)


def _cifar_split(path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    entry = _load_plain_pickle(path)
    try:
        data = np.asarray(_key(entry, "data", path))
        labels = np.asarray(_key(entry, "fine_labels", path), dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable data or labels ({exc})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: data must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(labels)} fine_labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: fine_labels outside [0, {num_classes})")
    # each row is the red plane, then green, then blue, each row-major 32x32
    images = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)))
    return images, torch.from_numpy(labels)


@DATASETS.register(config_cls=Cifar100Config, tags=(DECODED,))
def cifar100(config: Cifar100Config) -> ImageData:
    """CIFAR-100 (fine labels) from torchvision's cifar-100-python/ files; official split."""
    root = _root_path(config.root)
    folder = root / "cifar-100-python"
    if not folder.is_dir() and config.download:
        import torchvision

        log.info("downloading CIFAR-100 to %s", root)
        torchvision.datasets.CIFAR100(str(root), download=True)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"CIFAR-100 not found: no folder {folder}. Give the folder that contains "
            "cifar-100-python/ as `root:` under the dataset in the grid, or set "
            "`download: true` on a machine that is online."
        )
    for name in ("meta", "train", "test"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"CIFAR-100 file missing: {folder / name}")
    meta_path = folder / "meta"
    names = _key(_load_plain_pickle(meta_path), "fine_label_names", meta_path)
    if not isinstance(names, list) or len(names) < 2:
        raise ValueError(f"{meta_path}: fine_label_names must be a list of >= 2 names")
    train_x, train_y = _cifar_split(folder / "train", len(names))
    test_x, test_y = _cifar_split(folder / "test", len(names))
    return _with_train_stats(
        _resize_uint8(train_x, config.image_size),
        train_y,
        _resize_uint8(test_x, config.image_size),
        test_y,
        # "aquarium_fish" -> "aquarium fish": the names read as words in prompts
        [(n.decode() if isinstance(n, bytes) else str(n)).replace("_", " ") for n in names],
    )


# --------------------------------------------------------------------------- DTD


@dataclass(frozen=True)
class DtdConfig(DataOptions):
    root: str = DEFAULT_ROOT  # folder that holds dtd/ (~ is expanded)
    split: int = 1  # which of the 10 official splits (labels/{train,val,test}<split>.txt)
    image_size: int = 224  # stored resolution: shorter side resized to it, then centre-cropped
    download: bool = False  # fetch with torchvision when dtd/ is missing

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_root_and_size(self.root, self.image_size)
        if not 1 <= self.split <= 10:
            raise ValueError(f"split must be in 1..10, got {self.split}")


def _dtd_folder(root: Path) -> Path | None:
    """The folder with images/ and labels/: the official tarball's or torchvision's."""
    for folder in (root / "dtd", root / "dtd" / "dtd"):  # torchvision nests it once more
        if (folder / "images").is_dir() and (folder / "labels").is_dir():
            return folder
    return None


def _decode_square(path: Path, size: int) -> np.ndarray:
    """One image as (3, size, size) uint8: shorter side to ``size``, then centre crop."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")  # forces the full decode: truncated files fail here
    except FileNotFoundError:
        raise ValueError(f"DTD image listed in the label files is missing: {path}") from None
    except Exception as exc:
        raise ValueError(f"DTD image {path} cannot be decoded ({exc})") from None
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)  # antialiased when shrinking
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _dtd_list(folder: Path, name: str) -> list[str]:
    path = folder / "labels" / name
    if not path.is_file():
        raise FileNotFoundError(f"DTD label file missing: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@DATASETS.register(config_cls=DtdConfig, tags=(DECODED,))
def dtd(config: DtdConfig) -> ImageData:
    """Describable Textures (47 classes); train = official train + val, test = test."""
    root = _root_path(config.root)
    folder = _dtd_folder(root)
    if folder is None and config.download:
        import torchvision

        log.info("downloading DTD to %s", root)
        torchvision.datasets.DTD(str(root), download=True)
        folder = _dtd_folder(root)
    if folder is None:
        raise FileNotFoundError(
            f"DTD not found: no {root / 'dtd' / 'images'} with labels/ beside it. Give the "
            "folder that contains dtd/ as `root:` under the dataset in the grid, or set "
            "`download: true` on a machine that is online."
        )
    classes = sorted(p.name for p in (folder / "images").iterdir() if p.is_dir())
    index = {name: i for i, name in enumerate(classes)}
    k = config.split
    # the official val joins train (a grid asks for its own split with val_fraction);
    # the official test is held out
    parts = {
        "train": _dtd_list(folder, f"train{k}.txt") + _dtd_list(folder, f"val{k}.txt"),
        "test": _dtd_list(folder, f"test{k}.txt"),
    }
    loaded = []
    for part, entries in parts.items():
        if not entries:
            raise ValueError(f"DTD split {k}: the {part} list is empty")
        x = np.empty((len(entries), 3, config.image_size, config.image_size), dtype=np.uint8)
        y = np.empty(len(entries), dtype=np.int64)
        for i, entry in enumerate(entries):
            cls = entry.split("/", 1)[0]
            if cls not in index:
                raise ValueError(
                    f"DTD label entry {entry!r} names class {cls!r}, which has no folder "
                    f"in {folder / 'images'}"
                )
            x[i] = _decode_square(folder / "images" / entry, config.image_size)
            y[i] = index[cls]
        loaded += [torch.from_numpy(x), torch.from_numpy(y)]
    return _with_train_stats(*loaded, classes=[c.replace("_", " ") for c in classes])
