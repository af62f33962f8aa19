"""``cifar100``: CIFAR-100 (fine labels) from torchvision's ``cifar-100-python/`` files.

The files are Python pickles; they are read with an unpickler that rebuilds dicts,
lists, bytes and plain numpy arrays only, so that a hostile file cannot run code.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
from workers.data.images import resize_uint8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cifar100Config(SourceConfig):
    root: str = DEFAULT_ROOT  # folder that holds cifar-100-python/ (~ is expanded)
    download: bool = False  # fetch with torchvision when cifar-100-python/ is missing
    image_size: int = 32  # stored resolution; the 32 px originals are resized once if different

    def __post_init__(self) -> None:
        super().__post_init__()
        check_folder_arg("root", self.root)
        check_image_size(self.image_size)

    def local_paths(self) -> dict[str, str]:
        return {"root": absolute(self.root)}


@DATASETS.register(config_cls=Cifar100Config, tags=(DECODED,))
def cifar100(config: Cifar100Config) -> ImageData:
    """CIFAR-100 (fine labels) from torchvision's cifar-100-python/ files; official split."""
    root = Path(config.root).expanduser()
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
    train_x, train_y = _split(folder / "train", len(names))
    test_x, test_y = _split(folder / "test", len(names))
    return ImageData.from_splits(
        resize_uint8(train_x, config.image_size),
        train_y,
        resize_uint8(test_x, config.image_size),
        test_y,
        # "aquarium_fish" -> "aquarium fish": the names read as words in prompts
        [(n.decode() if isinstance(n, bytes) else str(n)).replace("_", " ") for n in names],
    )


def _split(path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
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


# --------------------------------------------------------------------------- pickles


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
