"""A user's plug-ins written as files, and a sandbox that forgets them after a test.

``write_lab_plugins`` writes what a lab outside vramsweep would: a package
``my_lab`` whose module ``vramsweep_ext`` registers its own backbone (``lab_net``: a
small patch MLP that is no timm model, exposing ``pretrained_cfg`` as backbones do),
and a single file ``head_only.py`` that registers a method (only the classifier
trains). Both refuse to run inside a Ray actor unless Ray shipped them to it, so
that a sweep that passes proves the shipping.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

LAB_BACKBONE = "lab_net"
LAB_METHOD = "head_only"
LAB_DIM = 32  # width of lab_net's features: its head has LAB_DIM * classes + classes params

# Raises inside a Ray actor (a Tune trial) when this file is not Ray's shipped copy.
_SHIPPED_CHECK = """
def _check_shipped():
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        if "runtime_resources" not in __file__:
            raise RuntimeError(f"{__name__} was not shipped by Ray: imported from {__file__}")
"""

_BACKBONE = (
    '''"""A lab's own backbone, registered from outside vramsweep."""

from torch import nn

from workers.backbones import BACKBONES, TRANSFORMER, BackboneConfig
'''
    + _SHIPPED_CHECK
    + f'''

class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class LabNet(nn.Module):
    def __init__(self, num_classes, size, dim={LAB_DIM}, depth=2):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        # what the trial reads of a backbone: its input resolution and its head's name
        self.pretrained_cfg = {{"input_size": (3, size, size), "classifier": "head"}}

    def forward(self, x):
        x = self.blocks(self.patch_embed(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(x).mean(1))


@BACKBONES.register(config_cls=BackboneConfig, tags=(TRANSFORMER,))
def {LAB_BACKBONE}(config, num_classes):
    """A lab's tiny patch MLP (16 px by default)."""
    _check_shipped()
    return LabNet(num_classes, config.img_size or 16)
'''
)

_METHOD = (
    '''"""Linear probing as a method, registered from outside vramsweep."""

from dataclasses import dataclass

from workers.methods import METHODS, Adapted
from workers.methods.base import is_classifier_param
'''
    + _SHIPPED_CHECK
    + f'''

@dataclass(frozen=True)
class HeadOnlyConfig:
    pass


@METHODS.register(config_cls=HeadOnlyConfig)
def {LAB_METHOD}(config, model, ctx):
    """Only the classifier trains."""
    _check_shipped()
    for name, param in model.named_parameters():
        param.requires_grad_(is_classifier_param(name, ctx.classifier))
    return Adapted(model)
'''
)


def write_lab_plugins(folder: Path) -> tuple[Path, Path]:
    """``folder/pkgs/my_lab/`` (a package: ``my_lab.vramsweep_ext`` registers
    ``lab_net``; importing the package imports it) and ``folder/head_only.py``
    (registers ``head_only``). Returns (the folder to put on the path, the file)."""
    package = folder / "pkgs" / "my_lab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from . import vramsweep_ext  # noqa: F401\n")
    (package / "vramsweep_ext.py").write_text(_BACKBONE)
    method = folder / "head_only.py"
    method.write_text(_METHOD)
    importlib.invalidate_caches()
    return folder / "pkgs", method


def write_module(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    importlib.invalidate_caches()
    return path


@contextlib.contextmanager
def plugin_sandbox(root: Path) -> Iterator[None]:
    """Undo what importing plug-ins from files under ``root`` did to this process: their
    modules, sys.path, the backbone and method registries' entries, the entry points
    loaded once per process."""
    from workers.backbones import BACKBONES
    from workers.methods import METHODS
    from workers.plugins import load_entry_points

    registries = [(r, dict(r._entries)) for r in (BACKBONES, METHODS)]
    modules, path = set(sys.modules), list(sys.path)
    load_entry_points.cache_clear()
    try:
        yield
    finally:
        for registry, entries in registries:
            registry._entries.clear()
            registry._entries.update(entries)
        for name in set(sys.modules) - modules:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if file.startswith((str(root), str(root.resolve()))):
                del sys.modules[name]
        sys.path[:] = path
        load_entry_points.cache_clear()
        importlib.invalidate_caches()
