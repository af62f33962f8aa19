"""Trial ids stay byte-identical after the fast canonical JSON (TrialSpec.to_json built
from memoised pieces, the id cached per spec), so old output folders resume.

The ids below were computed at commit 107b2db by the code before the change
(``sha256(canonical_json(dataclasses.asdict(spec) minus empty LATER_FIELDS))``); they
are a regression fixture, not a specification.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from orchestrator.expansion import expand
from orchestrator.grid import load_grid
from orchestrator.spec import LATER_FIELDS, TrainConfig, TrialSpec, canonical_json

REPO_ROOT = Path(__file__).parents[2]

SPECS = {
    "default": TrialSpec(),
    "lora": TrialSpec(backbone="vit_test", method="lora", method_args={"r": 4, "alpha": 8.0}),
    "nested": TrialSpec(
        backbone="tiny_vit_test",
        method="bitfit",
        method_args={"train_norm": True},
        checkpointing="static",
        checkpointing_args={"every": 2},
        seed=7,
        dataset="synthetic",
        dataset_args={
            "noise": 0.1,
            "tags": ["a", "b"],
            "nested": {"z": 1, "a": [1, 2.5, None]},
            "t": (0.08, 1.0),
        },
        budget_mb=512.5,
    ),
    "unicode": TrialSpec(
        backbone="vit_test",
        backbone_args={"pretrained": "/data/modèle ü\u2603.pth", "img_size": 16},
        method="full",
        dataset="imagefolder",
        dataset_args={"root": '/d/"q"\\x\t\n', "image_size": 64},
    ),
    "int_lr": TrialSpec(train=TrainConfig(lr=1, weight_decay=0, warmup_epochs=1), seed=2**31),
    "deploy": TrialSpec(
        backbone="vit_test",
        method="lora",
        method_args={"r": 2},
        deploy={"variants": ["float", "int8"], "ship": "int8", "calibration": 32},
    ),
    "deploy_empty": TrialSpec(backbone="vit_test", method="lora", method_args={"r": 2}, deploy={}),
    "baseline": TrialSpec(
        kind="baseline",
        backbone="vit_test",
        method="",
        baseline="zs",
        baseline_args={"k": 5, "temperature": 0.07},
        train=TrainConfig(epochs=1, precision="bf16"),
    ),
    "floats": TrialSpec(
        budget_mb=1e-3,
        method_args={"a": 1e300, "b": -0.0, "c": 1e-7, "d": 123456789.123, "e": True, "f": None},
    ),
}
IDS_BEFORE = {
    "default": "929e038eaef7",
    "lora": "bb2a0641a6ff",
    "nested": "d997b4244b9f",
    "unicode": "a4c4c14645f2",
    "int_lr": "6f5b57e86408",
    "deploy": "1615b98eecea",
    "deploy_empty": "96ba2e0cedf4",
    "baseline": "af47d4adb1f1",
    "floats": "1fb4e5a2efda",
}


def _json_before(spec: TrialSpec) -> str:
    """The canonical JSON as it was computed before: a deep copy of every field."""
    data = dataclasses.asdict(spec)
    for name in LATER_FIELDS:
        if not data[name]:
            del data[name]
    return canonical_json(data)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_trial_id_is_what_it_was(name: str) -> None:
    spec = SPECS[name]
    assert spec.to_json() == _json_before(spec)
    assert spec.trial_id == IDS_BEFORE[name]
    assert hashlib.sha256(_json_before(spec).encode()).hexdigest()[:12] == IDS_BEFORE[name]


def test_deploy_joins_the_id_only_when_given() -> None:
    assert SPECS["deploy_empty"].trial_id != SPECS["deploy"].trial_id
    assert '"deploy"' not in SPECS["deploy_empty"].to_json()
    assert '"deploy":{"calibration":32' in SPECS["deploy"].to_json()


@pytest.mark.parametrize("grid", ["grid/smoke.yaml", "grid/budget.yaml"])
def test_every_expanded_spec_has_the_json_of_before(grid: str) -> None:
    """Shared argument dicts, shared TrainConfig: the memoised pieces equal a fresh
    encoding of every spec, and the cached id is the hash of it."""
    specs = expand(load_grid(REPO_ROOT / grid))
    assert len(specs) >= 12
    for spec in specs:
        assert spec.to_json() == _json_before(spec)
        assert spec.trial_id == hashlib.sha256(_json_before(spec).encode()).hexdigest()[:12]


def test_cached_id_does_not_follow_a_replaced_spec() -> None:
    """``dataclasses.replace`` makes a new spec whose id is its own."""
    spec = SPECS["lora"]
    assert spec.trial_id == IDS_BEFORE["lora"]  # cached now
    other = dataclasses.replace(spec, seed=1)
    assert other.trial_id != spec.trial_id
    assert other.trial_id == hashlib.sha256(_json_before(other).encode()).hexdigest()[:12]
    assert other == TrialSpec.from_json(other.to_json())


def test_nan_in_a_spec_still_fails_to_encode() -> None:
    """Non-finite numbers are not JSON: the fast path raises as json.dumps did."""
    for spec in (TrialSpec(budget_mb=float("inf")), TrialSpec(method_args={"a": float("nan")})):
        with pytest.raises(ValueError, match="not JSON compliant"):
            spec.to_json()
