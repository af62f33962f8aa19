"""Loading a registered dataset: decoded once, then kept in the process and on disk.

A worker process that runs several trials decodes each dataset once (an in-process
cache of the last two); a source tagged ``DECODED`` (image files, pickles) is also
saved decoded under ``$VRAMSWEEP_CACHE`` for the next sweep, keyed by the dataset and
every argument that changes its tensors. Options (subset, validation split,
augmentation) are applied after, by ``select``: one decoded copy serves every trial.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from workers.data.core import (
    DATASETS,
    DECODED,
    ImageData,
    SourceConfig,
    data_options,
    source_args,
)
from workers.data.selection import select

log = logging.getLogger(__name__)

CACHE_ENV = "VRAMSWEEP_CACHE"  # folder of decoded datasets (default below)
CACHE_FORMAT = 2  # bump when the decoded layout changes: old files are then ignored


def load_dataset(name: str, args: dict | None) -> ImageData:
    """Load registered dataset ``name`` with grid arguments ``args``: the decoded source
    (see ``load_source``), then the subset and validation split of its options.

    Example:
        >>> data = load_dataset("digits", {"image_size": 16, "val_fraction": 0.1})
        >>> data.train_x.shape[1:], data.num_classes
        (torch.Size([3, 16, 16]), 10)
    """
    return select(load_source(name, args)[0], data_options(name, args))


def load_source(name: str, args: dict | None) -> tuple[ImageData, str]:
    """The decoded dataset (all images, official splits) and where it came from:
    ``decoded`` (built now), ``disk_cache`` (a decoded copy on disk) or ``process_cache``.

    Callers must not modify the returned tensors in place: they are shared.
    """
    key = json.dumps(source_args(name, args), sort_keys=True)
    hits = _load_cached.cache_info().hits
    data, how = _load_cached(name, key)
    return data, ("process_cache" if _load_cached.cache_info().hits > hits else how)


def clear_process_cache() -> None:
    """Forget the datasets this process decoded (the disk cache is kept)."""
    _load_cached.cache_clear()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/vramsweep/decoded")).expanduser()


def cache_path(name: str, args: dict[str, Any]) -> Path:
    """Where dataset ``name`` decoded with ``args`` is kept: keyed by the dataset and
    every argument that changes the tensors (source files, split, resolution)."""
    key_args = {k: v for k, v in source_args(name, args).items() if k != "download"}
    config = DATASETS.make_config(name, args)
    if isinstance(config, SourceConfig):
        key_args.update(config.local_paths())
    key = json.dumps({"dataset": name, "args": key_args, "format": CACHE_FORMAT}, sort_keys=True)
    return cache_dir() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _from_disk_cache(name: str, args: dict[str, Any]) -> tuple[ImageData, str]:
    path = cache_path(name, args)
    if path.is_file():
        try:
            data = ImageData.from_state(torch.load(path, map_location="cpu", weights_only=True))
            log.info("dataset %s: decoded copy read from %s", name, path)
            return data, "disk_cache"
        except Exception as exc:  # noqa: BLE001 - a bad cache file is decoded again
            log.warning("dataset %s: ignoring unreadable cache %s (%s)", name, path, exc)
    data = DATASETS.build(name, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(data.state(), tmp)
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
    if data.skipped:
        log.warning(
            "dataset %s: %d unreadable images were skipped (on_bad_image: skip), e.g. %s",
            name,
            len(data.skipped),
            data.skipped[0],
        )
    return data, how
