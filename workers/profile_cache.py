"""The block-profile cache: a checkpointing profile measured once per key, reused after.

Profiling every block (``checkpointing.profile_blocks``) takes seconds, and its result
depends only on the model, the batch shape, the precision and the device: a sweep over
seeds, learning rates or same-resolution datasets would measure it again per trial.
Entries are small JSON files under ``$VRAMSWEEP_CACHE/profiles`` (beside the decoded
datasets), shared by the trials on a node and across sweeps. Like the decode cache,
writes are atomic (temporary file, rename); an entry is trusted only when its format,
its whole key and the model's block chain match, else it is measured again and
overwritten.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import nn

from orchestrator.spec import TrialSpec, canonical_json
from workers.checkpointing import BlockProfile, Profile
from workers.data.cache import cache_dir
from workers.structure import find_blocks

log = logging.getLogger(__name__)

PROFILE_FORMAT = 2  # bump when Profile's fields or their meaning change
LIBRARIES = ("torch", "timm", "peft")  # their kernels and module code shape the profile


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@functools.cache
def code_digest() -> str:
    """Digest of this package's worker code (planner, recompute modes, methods, model
    structure): an entry measured by other code is measured again."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def trial_key(
    spec: TrialSpec, batch_shape: tuple[int, ...], dtype: str, device: str, timed: bool
) -> dict[str, Any]:
    """Everything a trial's profile depends on (``timed``: adaptive's profile has the
    per-mode times, static's only bytes; no strategy argument changes the profile)."""
    return {
        "backbone": spec.backbone,
        "backbone_args": spec.backbone_args,
        "method": spec.method,
        "method_args": spec.method_args,
        "num_classes": spec.dataset_args.get("num_classes"),  # the head's size
        "batch_shape": list(batch_shape),  # batch size and input resolution
        "dtype": dtype,
        "precision": spec.train.precision,
        "device": device,  # type and name (a CPU's thread count included)
        "timed": timed,
        "libraries": library_versions(),
        "code": code_digest(),
    }


@dataclass(frozen=True)
class ProfileCache:
    """One key's entry: ``load`` the profile of ``model`` or None, ``store`` it.

    >>> cache = ProfileCache({"backbone": "vit_test", ...})
    >>> profile = cache.load(model) or cache.store(model, profile_blocks(model, fwd))
    """

    key: dict[str, Any]
    folder: Path | None = None  # default: $VRAMSWEEP_CACHE/profiles

    @property
    def path(self) -> Path:
        digest = hashlib.sha256(canonical_json(self.key).encode()).hexdigest()[:16]
        return (self.folder or cache_dir() / "profiles") / f"{digest}.json"

    def load(self, model: nn.Module) -> Profile | None:
        """The cached profile, or None when missing, unreadable, foreign or stale."""
        path = self.path
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            return self._validated(entry, _chain(model))
        except Exception as exc:  # noqa: BLE001 - a bad entry is measured again
            log.warning("ignoring block profile %s: %s", path, exc)
            return None

    def store(self, model: nn.Module, profile: Profile) -> Profile:
        entry = {
            "format": PROFILE_FORMAT,
            "key": self.key,
            "chain": _chain(model),
            "prefix_bytes": profile.prefix_bytes,
            "tail_bytes": profile.tail_bytes,
            "blocks": [dataclasses.asdict(b) for b in profile.blocks],
        }
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entry, sort_keys=True))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
        return profile

    def _validated(self, entry: dict[str, Any], chain: list[str]) -> Profile:
        if entry.get("format") != PROFILE_FORMAT:
            raise ValueError(f"format {entry.get('format')!r}, expected {PROFILE_FORMAT}")
        if canonical_json(entry.get("key")) != canonical_json(self.key):
            raise ValueError("written for another key")
        if entry.get("chain") != chain:
            raise ValueError("its block chain is not this model's")
        blocks = tuple(BlockProfile(**b) for b in entry["blocks"])
        names = [b.name for b in blocks]
        if [n for n in chain if n in names] != names:  # profiled blocks: the called ones
            raise ValueError("its blocks are not a sub-chain of this model's")
        return Profile(blocks, int(entry["prefix_bytes"]), int(entry["tail_bytes"]))


def _chain(model: nn.Module) -> list[str]:
    return [name for name, _ in find_blocks(model)]
