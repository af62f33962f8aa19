"""Worker fixtures: a small dataset that every trial test can share."""

from __future__ import annotations

import pytest

from workers.data import ImageData, load_dataset
from workers.methods import check_applicable
from workers.registry import RegistryError

TINY_BACKBONES = ["vit_test", "tiny_vit_test"]
TINY_CNN_BACKBONES = ["mobilenetv2_test", "mobilenetv3_test"]  # inverted residual family
TINY_MAMBA_BACKBONES = ["vim_test", "mambavision_test"]


def applicable_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """(backbone, method) pairs over the tiny backbones where the method applies."""
    pairs = []
    for method in methods:
        for backbone in TINY_BACKBONES + TINY_CNN_BACKBONES + TINY_MAMBA_BACKBONES:
            try:
                check_applicable(method, backbone)
            except RegistryError:
                continue
            pairs.append((backbone, method))
    return pairs


@pytest.fixture(scope="session")
def synthetic_data() -> ImageData:
    return load_dataset("synthetic", {"num_classes": 4, "images_per_class": 24, "image_size": 16})
