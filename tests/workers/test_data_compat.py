"""The registered datasets as records and caches know them: names, resolved arguments,
trial ids and decode-cache files are what they were before the sources moved into
``workers/data/`` and grew arguments (``on_bad_image``), so old sweeps resume.

The reference values below were computed with ``workers/datasets.py`` as of commit
1b164d9 (the last one before the package); they are a regression fixture, not a
specification: change them only with a deliberate break of old output folders.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.spec import TrialSpec
from workers import data
from workers.data import DATASETS

OPTIONS = {
    "fraction": 1.0,
    "per_class": 0,
    "val_fraction": 0.0,
    "split_seed": 0,
    "augment": False,
    "crop_scale": [0.08, 1.0],
    "crop_ratio": [0.75, 1.3333333333333333],
    "flip": True,
    "resident": "auto",
}
RESOLVED_BEFORE = {
    "digits": {**OPTIONS, "image_size": 32, "test_fraction": 0.2},
    "synthetic": {
        **OPTIONS,
        "num_classes": 4,
        "images_per_class": 64,
        "image_size": 16,
        "test_fraction": 0.25,
        "noise": 0.25,
    },
    "cifar100": {**OPTIONS, "root": "~/.cache/vramsweep/data", "download": False, "image_size": 32},
    "dtd": {
        **OPTIONS,
        "root": "~/.cache/vramsweep/data",
        "split": 1,
        "image_size": 224,
        "download": False,
    },
}
TRIAL_IDS_BEFORE = {"digits": "be42da682db2", "cifar100": "2052a6cfc3d4", "dtd": "f91d46420db2"}
CACHE_FILES_BEFORE = [
    ("cifar100", {"root": "/nonexistent/root"}, "cifar100-8025aaaf656b46c3.pt"),
    ("dtd", {"root": "/nonexistent/root"}, "dtd-8d13fe37b3060b22.pt"),
    ("dtd", {"root": "/nonexistent/root", "split": 3, "image_size": 64}, "dtd-139dae8324c6bfbd.pt"),
]


@pytest.mark.parametrize("name", sorted(RESOLVED_BEFORE))
def test_resolved_arguments_at_their_defaults_are_unchanged(name: str) -> None:
    assert DATASETS.resolve_args(name, {}) == RESOLVED_BEFORE[name]
    assert DATASETS.resolve_args(name, None) == RESOLVED_BEFORE[name]


@pytest.mark.parametrize("name", sorted(TRIAL_IDS_BEFORE))
def test_trial_ids_are_unchanged(name: str) -> None:
    args = DATASETS.resolve_args(name, {})
    spec = TrialSpec(backbone="vit_test", method="full", dataset=name, dataset_args=args)
    assert spec.trial_id == TRIAL_IDS_BEFORE[name]


@pytest.mark.parametrize(("name", "args", "file"), CACHE_FILES_BEFORE)
def test_decode_cache_files_are_unchanged(name: str, args: dict, file: str) -> None:
    assert data.cache_path(name, args).name == file


def test_on_bad_image_enters_dtds_arguments_only_when_not_the_default() -> None:
    assert "on_bad_image" not in DATASETS.resolve_args("dtd", {"on_bad_image": "fail"})
    skip = DATASETS.resolve_args("dtd", {"on_bad_image": "skip"})
    assert skip == {**RESOLVED_BEFORE["dtd"], "on_bad_image": "skip"}
    # skipping may store fewer images: another decode, another cache file
    root = {"root": str(Path("/nonexistent/root"))}
    assert data.cache_path("dtd", {**root, "on_bad_image": "skip"}).name != CACHE_FILES_BEFORE[1][2]


def test_every_source_is_registered() -> None:
    names = ["cifar100", "digits", "dtd", "hf", "imagefolder", "synthetic", "torchvision"]
    assert set(names) <= set(DATASETS.names())  # plug-ins of other tests may add theirs
    assert {n for n in names if data.DECODED in DATASETS.get(n).tags} == {
        "cifar100",
        "dtd",
        "hf",
        "imagefolder",
        "torchvision",
    }
