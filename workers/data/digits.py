"""``digits``: scikit-learn's bundled 8x8 handwritten digits, the offline default."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from workers.data.core import DATASETS, ImageData, SourceConfig, check_image_size
from workers.data.images import check_decoded_fits
from workers.data.selection import split_arrays

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DigitsConfig(SourceConfig):
    image_size: int = 32  # stored resolution (the 8x8 originals are upsampled once)
    test_fraction: float = 0.2  # held-out share of each class

    def __post_init__(self) -> None:
        super().__post_init__()
        check_image_size(self.image_size)
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


@DATASETS.register(config_cls=DigitsConfig)
def digits(config: DigitsConfig) -> ImageData:
    """scikit-learn's bundled handwritten digits: 1797 images, 10 classes, offline."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # a float grey copy (4 bytes per pixel) then the uint8 image (1 byte, 3 channels viewed)
    check_decoded_fits("digits", len(bunch.images), config.image_size, bytes_per_pixel=5)
    gray = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    gray = F.interpolate(gray, size=(config.image_size,) * 2, mode="bilinear", align_corners=False)
    images = (gray.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    return split_arrays(
        images.numpy(), bunch.target, config.test_fraction, [str(d) for d in range(10)]
    )
