"""Images decoded one by one into a source's stored squares, and what a bad one costs.

The file-based sources (``dtd``, ``imagefolder``, ``hf``, ``torchvision``) hand each
image to an ``ImageDecoder`` as a way to open it (a path, encoded bytes, a PIL image
or an array). It becomes (3, size, size) uint8: RGB, shorter side resized to
``size``, centre-cropped. An image that cannot be opened or decoded is named with its
reason and, by the source's ``on_bad_image`` argument, fails the decode (``fail``,
the default) or is left out, logged and counted in ``ImageData.skipped`` (``skip``).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ON_BAD_IMAGE = ("fail", "skip")

# One image as its source knows it: (name for messages, opener, label). The opener
# returns a path, encoded bytes, a PIL image or an (H, W[, C]) uint8 array.
Sample = tuple[str, Callable[[], Any], int]


def check_on_bad_image(value: str) -> None:
    if value not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {list(ON_BAD_IMAGE)}, got {value!r}")


def image_extensions() -> frozenset[str]:
    """File suffixes (lowercase, with the dot) of every format Pillow can open."""
    from PIL import Image

    return frozenset(Image.registered_extensions())


class ImageDecoder:
    """Decodes the images of one source to ``size`` px squares under its bad-image
    policy; ``skipped`` lists each image left out as "name: reason"."""

    def __init__(self, source: str, size: int, on_bad_image: str) -> None:
        check_on_bad_image(on_bad_image)
        self.source, self.size, self.on_bad_image = source, size, on_bad_image
        self.skipped: list[str] = []

    def decode(self, name: str, opener: Callable[[], Any]) -> np.ndarray | None:
        """(3, size, size) uint8, or None when the image is bad and skipped."""
        try:
            image = _rgb(opener())
        except Exception as exc:  # noqa: BLE001 - any failure is a bad image, named below
            self._bad(name, _reason(exc))
            return None
        return square(image, self.size)

    def stack(self, samples: Iterable[Sample], count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``count`` samples decoded into (n, 3, size, size) uint8 images and (n,)
        labels, n = count less those skipped."""
        check_decoded_fits(self.source, count, self.size)
        x = np.empty((count, 3, self.size, self.size), dtype=np.uint8)
        y = np.empty(count, dtype=np.int64)
        n = 0
        for name, opener, label in samples:
            image = self.decode(name, opener)
            if image is not None:
                x[n], y[n] = image, label
                n += 1
        if not n:  # no statistics, no training: a clear error, not a NaN later
            raise ValueError(f"{self.source}: none of the {count} images of a split decoded")
        return torch.from_numpy(x[:n]), torch.from_numpy(y[:n])

    def _bad(self, name: str, reason: str) -> None:
        if self.on_bad_image == "fail":
            raise ValueError(
                f"{self.source} image {name} cannot be decoded ({reason}); "
                "set `on_bad_image: skip` under the dataset to leave such images out"
            )
        log.warning("%s: skipping image %s (%s)", self.source, name, reason)
        self.skipped.append(f"{name}: {reason}")


def _reason(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file missing"
    return f"{type(exc).__name__}: {exc}"


def _rgb(source: Any) -> Any:
    """``source`` opened and fully decoded as an RGB PIL image."""
    from PIL import Image

    if isinstance(source, str | Path):
        with Image.open(source) as img:
            return img.convert("RGB")  # forces the full decode: truncated files fail here
    if isinstance(source, bytes):
        with Image.open(io.BytesIO(source)) as img:
            return img.convert("RGB")
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    array = np.asarray(source)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W[, C]) uint8 array, got {array.dtype} {array.shape}")
    return Image.fromarray(array).convert("RGB")


def square(image: Any, size: int) -> np.ndarray:
    """A PIL RGB image as (3, size, size) uint8: shorter side to ``size``, centre crop."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)  # antialiased shrinking
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


AVAILABLE_SHARE = 0.8  # of the machine's available memory a decoded dataset may take


def available_bytes() -> int | None:
    """Memory this machine can still give (Linux ``MemAvailable``; None elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_decoded_fits(source: str, count: int, size: int, bytes_per_pixel: int = 3) -> None:
    """Refuse, before allocating, a decoded dataset larger than the memory available
    (``bytes_per_pixel``: of the decoded arrays and the copies that make them)."""
    need = count * bytes_per_pixel * size * size
    free = available_bytes()
    if free is not None and need > AVAILABLE_SHARE * free:
        gib = 1 << 30
        raise ValueError(
            f"{source}: {count} images at {size} px would take {need / gib:.1f} GiB decoded, "
            f"more than the {free / gib:.1f} GiB this machine has available; "
            "lower image_size (or fraction / per_class)"
        )


def resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, 3, H, W) uint8 images to size x size once, antialiased, in chunks."""
    if x.shape[-2:] == (size, size):
        return x
    check_decoded_fits("dataset", len(x), size)
    out = torch.empty(len(x), 3, size, size, dtype=torch.uint8)
    for start in range(0, len(x), 4096):  # bounds the float copy to ~50 MB at 32 px
        f = x[start : start + 4096].float()
        f = F.interpolate(
            f, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[start : start + len(f)] = f.round_().clamp_(0, 255).to(torch.uint8)
    return out
