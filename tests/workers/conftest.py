"""Worker fixtures: a small dataset that every trial test can share."""

from __future__ import annotations

import pytest

from workers.datasets import ImageData, load_dataset

TINY_BACKBONES = ["vit_test", "tiny_vit_test"]
TINY_CNN_BACKBONES = ["mobilenetv2_test", "mobilenetv3_test"]  # inverted residual family


@pytest.fixture(scope="session")
def synthetic_data() -> ImageData:
    return load_dataset("synthetic", {"num_classes": 4, "per_class": 24, "image_size": 16})
