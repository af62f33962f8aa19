"""Shared fixtures: a minimal valid grid, written to a file on demand; a Ray token of
the test session's own."""

from __future__ import annotations

import copy
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml


def _session_ray_token() -> None:
    """Ray 2.60 authenticates with a token (``ray start`` in token mode fails without
    one) and a first ``ray.init`` would write it to ``~/.ray/auth_token``. The tests
    make their own, in a temporary file that every Ray process started by the session
    (``ray start``, drivers, ``orchestrate`` subprocesses) reads through
    ``RAY_AUTH_TOKEN_PATH``: they neither depend on nor write to the user's home."""
    if os.environ.get("RAY_AUTH_TOKEN_PATH") or os.environ.get("RAY_AUTH_TOKEN"):
        return
    folder = tempfile.mkdtemp(prefix="vramsweep-ray-token-")
    path = Path(folder) / "auth_token"
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)


_session_ray_token()
# matplotlib (the report's figures) keeps its font cache under ~/.cache unless told
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="vramsweep-mpl-"))
# decoded datasets and block profiles: a session's own folder, never the user's cache
os.environ.setdefault("VRAMSWEEP_CACHE", tempfile.mkdtemp(prefix="vramsweep-cache-"))

# The smallest grid that trains something real in a couple of seconds on one core.
TINY_GRID: dict[str, Any] = {
    "name": "tiny",
    "output": "out",
    "budget_mb": 2048,
    "seeds": [0],
    "datasets": {"synthetic": {"num_classes": 4, "images_per_class": 24, "image_size": 16}},
    "backbones": {"vit_test": {"img_size": 16}},
    "methods": {"full": {}, "bitfit": {}},
    "checkpointing": ["none"],
    "train": {"epochs": 1, "batch_size": 16, "lr": 1.0e-3, "max_steps": 3},
    "resources": {"cpus_per_trial": 1, "max_concurrent": 2},
}


@pytest.fixture
def tiny_grid(tmp_path: Path) -> dict[str, Any]:
    """A fresh copy of TINY_GRID whose output lies under tmp_path."""
    grid = copy.deepcopy(TINY_GRID)
    grid["output"] = str(tmp_path / "out")
    return grid


@pytest.fixture
def write_grid(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    """Write a grid mapping to a YAML file and return its path."""
    counter = iter(range(10_000))

    def write(grid: dict[str, Any]) -> Path:
        path = tmp_path / f"grid{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(grid, sort_keys=False))
        return path

    return write
