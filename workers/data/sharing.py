"""A decoded dataset in the Ray object store: decoded once per sweep, mapped by trials.

The driver puts each dataset of a sweep in the object store once (``to_shared``);
every trial process of a node then maps the same memory (``from_shared``) instead of
reading or decoding it again. Plain numpy arrays are what the store keeps out of band.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import numpy as np
import torch

from workers.data.core import ImageData, source_args

log = logging.getLogger(__name__)


def shared_key(name: str, args: dict[str, Any] | None) -> str:
    """Names one decoded dataset among those a sweep shares (dataset + source arguments)."""
    return json.dumps({"dataset": name, "args": source_args(name, args)}, sort_keys=True)


def to_shared(data: ImageData) -> dict[str, Any]:
    """``data`` as plain numpy arrays and numbers, the form the Ray object store keeps
    out of band: every process of a node that gets it maps the same memory."""
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in data.state().items()}


def from_shared(obj: dict[str, Any]) -> ImageData:
    """``ImageData`` over the arrays of ``to_shared`` without copying them. Arrays from
    the object store are read-only; nothing here writes into a dataset's tensors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return ImageData.from_state(
            {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in obj.items()}
        )
