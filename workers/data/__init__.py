"""Datasets: whole datasets decoded once into uint8 tensors, batches made with tensor ops.

One module per source, each registered under its grid name: ``digits`` (scikit-learn's
bundled digits, the offline default), ``synthetic`` (generated, for tests),
``cifar100`` and ``dtd`` (official files), ``imagefolder`` (class-per-folder images),
``hf`` (Hugging Face ``datasets``), ``torchvision`` (any of its dataset classes).
Adding a source is adding one module that registers into ``DATASETS`` and importing
it here. Beside the sources: ``core`` (registry, ``ImageData``, ``DataOptions``),
``cache`` (decode once: process and disk cache), ``selection`` (subset, validation
split), ``batches`` (batching and augmentation on the device), ``resample`` (crops
and resizes of a batch, separably), ``sharing`` (the Ray object store) and ``images``
(image files decoded, bad images handled).
"""

from workers.data import (  # noqa: F401  (registration)
    cifar100,
    digits,
    dtd,
    hf,
    imagefolder,
    synthetic,
    torchvision,
)
from workers.data.batches import Augment, batches, crop_transforms, resample
from workers.data.cache import (
    CACHE_ENV,
    cache_path,
    clear_process_cache,
    load_dataset,
    load_source,
)
from workers.data.core import (
    DATASETS,
    DECODED,
    DEFAULT_ROOT,
    DataOptions,
    ImageData,
    SourceConfig,
    SourceError,
    check_source,
    data_options,
    resident_on,
    source_args,
)
from workers.data.selection import select
from workers.data.sharing import from_shared, shared_key, to_shared

__all__ = [
    "CACHE_ENV",
    "DATASETS",
    "DECODED",
    "DEFAULT_ROOT",
    "Augment",
    "DataOptions",
    "ImageData",
    "SourceConfig",
    "SourceError",
    "batches",
    "cache_path",
    "check_source",
    "clear_process_cache",
    "crop_transforms",
    "data_options",
    "from_shared",
    "load_dataset",
    "load_source",
    "resample",
    "resident_on",
    "select",
    "shared_key",
    "source_args",
    "to_shared",
]
