"""``synthetic``: generated stripes, for tests and overhead measurements."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from workers.data.core import DATASETS, SPLIT_SEED, ImageData, SourceConfig, check_image_size
from workers.data.selection import split_arrays

log = logging.getLogger(__name__)

MAX_GENERATED = 100_000  # classes, and images per class: a sane bound for test data


@dataclass(frozen=True)
class SyntheticConfig(SourceConfig):
    num_classes: int = 4
    images_per_class: int = 64  # generated per class, before the split
    image_size: int = 16
    test_fraction: float = 0.25
    noise: float = 0.25  # std of the Gaussian pixel noise, in [0, 1] units

    def __post_init__(self) -> None:
        super().__post_init__()
        check_image_size(self.image_size, least=4)
        for name in ("num_classes", "images_per_class"):
            value = getattr(self, name)
            if value < 2:
                raise ValueError(f"synthetic needs {name} >= 2, got {value}")
            if value > MAX_GENERATED:
                raise ValueError(f"{name} must be at most {MAX_GENERATED}, got {value}")
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
    return split_arrays(images.numpy(), labels.numpy(), config.test_fraction, classes)
