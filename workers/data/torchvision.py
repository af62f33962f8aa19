"""``torchvision``: any classification dataset class of ``torchvision.datasets`` by name.

``name`` is the class (``Flowers102``, ``MNIST``, ``Food101``, ...), built twice with
``root``, ``download`` and its own split arguments: ``train_args`` / ``test_args``
(e.g. ``{split: train}``), by default ``train=True`` / ``train=False`` for a class
that takes ``train``, else ``split="train"`` / ``split="test"``. Its items' images
(PIL images or arrays) become the stored uint8 squares; class names come from the
class's ``classes`` when it has them, else the sorted distinct labels.

Example grid entry:
    datasets:
      torchvision: {name: Flowers102, root: ~/data, download: true, image_size: 224}
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers.data.core import (
    DATASETS,
    DECODED,
    DEFAULT_ROOT,
    ImageData,
    SourceConfig,
    SourceError,
    absolute,
    check_folder_arg,
    check_image_size,
)
from workers.data.images import ImageDecoder, Sample, check_on_bad_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchvisionConfig(SourceConfig):
    name: str = ""  # a class of torchvision.datasets, e.g. Flowers102
    root: str = DEFAULT_ROOT  # the class's root folder (~ is expanded)
    download: bool = False  # let the class fetch its files (online machines)
    train_args: dict[str, Any] = field(default_factory=dict)  # its training split's arguments
    test_args: dict[str, Any] = field(default_factory=dict)  # its held-out split's arguments
    image_size: int = 224  # stored resolution: shorter side resized to it, then centre-cropped
    on_bad_image: str = "fail"  # an image that cannot be decoded: fail | skip (counted)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_folder_arg("root", self.root)
        check_image_size(self.image_size)
        check_on_bad_image(self.on_bad_image)
        params = _parameters(dataset_class(self.name))
        if self.download and "download" not in params:
            raise ValueError(f"torchvision.datasets.{self.name} cannot download its files")
        for arg_name, args in self.split_args().items():
            unknown = sorted(set(args) - set(params))
            if unknown and not _takes_any_keyword(dataset_class(self.name)):
                raise ValueError(
                    f"{arg_name}: torchvision.datasets.{self.name} takes no {unknown}; "
                    f"it takes {sorted(params)}"
                )

    def split_args(self) -> dict[str, dict[str, Any]]:
        """The class's arguments of each split: the grid's, else the usual defaults."""
        params = _parameters(dataset_class(self.name))
        if "train" in params:
            defaults = ({"train": True}, {"train": False})
        elif "split" in params:
            defaults = ({"split": "train"}, {"split": "test"})
        elif not (self.train_args and self.test_args):
            raise ValueError(
                f"torchvision.datasets.{self.name} takes neither train nor split: give "
                f"train_args and test_args (its arguments: {sorted(params)})"
            )
        else:
            defaults = ({}, {})
        return {
            "train_args": self.train_args or defaults[0],
            "test_args": self.test_args or defaults[1],
        }

    def local_paths(self) -> dict[str, Any]:
        paths: dict[str, Any] = {"root": absolute(self.root)}
        for arg_name, args in (("train_args", self.train_args), ("test_args", self.test_args)):
            if "root" in args:  # a root per split
                paths[arg_name] = {**args, "root": absolute(str(args["root"]))}
        return paths

    def check(self) -> None:
        """Each split's root folder exists, unless the class will download into it."""
        if "root" not in _parameters(dataset_class(self.name)) or self.download:
            return
        for arg_name, args in self.split_args().items():
            root = Path(str(args.get("root", self.root))).expanduser()
            if not root.is_dir():
                raise SourceError(
                    arg_name if "root" in args else "root",
                    f"no folder {root} for torchvision.datasets.{self.name}; give the folder "
                    "that holds its files, or set `download: true` on a machine that is online",
                )


@DATASETS.register(config_cls=TorchvisionConfig, tags=(DECODED,))
def torchvision(config: TorchvisionConfig) -> ImageData:
    """A torchvision.datasets classification dataset, built by its class name."""
    config.check()
    cls = dataset_class(config.name)
    decoder = ImageDecoder(f"torchvision {config.name}", config.image_size, config.on_bad_image)
    loaded, names = [], None
    for split, args in config.split_args().items():
        ds = _build(config, cls, args)
        names = names or getattr(ds, "classes", None)
        loaded += decoder.stack(_samples(config.name, split, ds), len(ds))
    train_x, train_y, test_x, test_y = loaded
    train_y, test_y, classes = _class_indices(train_y, test_y, names)
    return ImageData.from_splits(
        train_x, train_y, test_x, test_y, classes=classes, skipped=decoder.skipped
    )


@functools.cache
def dataset_class(name: str) -> type:
    """``torchvision.datasets.<name>``, a dataset class; close names suggested if not."""
    import torchvision.datasets as tv

    valid = sorted(
        n
        for n in dir(tv)
        if inspect.isclass(getattr(tv, n)) and issubclass(getattr(tv, n), tv.VisionDataset)
    )
    if name not in valid:
        by_lower = {n.lower(): n for n in valid}  # "mnist" is close to MNIST
        close = [by_lower[n] for n in difflib.get_close_matches(name.lower(), by_lower, 3, 0.5)]
        hint = f"close: {', '.join(close)}" if close else f"valid: {', '.join(valid)}"
        raise ValueError(f"name {name!r} is no torchvision.datasets class; {hint}")
    return getattr(tv, name)


def _parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls).parameters)


def _takes_any_keyword(cls: type) -> bool:
    kinds = (p.kind for p in inspect.signature(cls).parameters.values())
    return inspect.Parameter.VAR_KEYWORD in kinds


def _build(config: TorchvisionConfig, cls: type, args: dict[str, Any]) -> Any:
    params = _parameters(cls)
    kwargs: dict[str, Any] = {"root": str(Path(config.root).expanduser())}
    if "download" in params:
        kwargs["download"] = config.download
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    kwargs |= args  # the split's own arguments win (a root per split, say)
    if "root" in args:
        kwargs["root"] = str(Path(str(args["root"])).expanduser())
    try:
        return cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 - missing files, bad arguments: named here
        raise ValueError(
            f"torchvision.datasets.{config.name}({kwargs}) failed: {type(exc).__name__}: {exc}"
        ) from None


def _samples(name: str, split: str, ds: Any) -> Iterator[Sample]:
    """Each item's image and label; an item that cannot be read is a bad image."""
    files = getattr(ds, "samples", None)  # ImageFolder-like classes list their files
    for i in range(len(ds)):
        where = files[i][0] if files else f"{name} {split}[{i}]"
        try:
            image, target = ds[i]
        except Exception as exc:  # noqa: BLE001 - the decoder names and handles it
            yield where, functools.partial(_raise, exc), -1
            continue
        yield where, functools.partial(_identity, image), _label(name, target)


def _label(name: str, target: Any) -> int:
    try:
        return int(target)
    except (TypeError, ValueError):
        raise ValueError(
            f"torchvision.datasets.{name} gives targets like {target!r}, not class indices: "
            "only classification datasets fit"
        ) from None


def _class_indices(
    train_y: torch.Tensor, test_y: torch.Tensor, names: Any
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Labels as 0..K-1 and their names: the class's own ``classes`` when they cover the
    labels, else the sorted distinct labels of both splits."""
    labels = torch.cat([train_y, test_y])
    if isinstance(names, list | tuple) and labels.min() >= 0 and labels.max() < len(names):
        return train_y, test_y, [str(n).replace("_", " ") for n in names]
    values, index = torch.unique(labels, sorted=True, return_inverse=True)
    return index[: len(train_y)], index[len(train_y) :], [str(v) for v in values.tolist()]


def _raise(exc: Exception) -> Any:
    raise exc


def _identity(value: Any) -> Any:
    return value
