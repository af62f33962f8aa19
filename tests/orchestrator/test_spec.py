"""TrialSpec and TrainConfig: ids, JSON round trip, validation."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.spec import TrainConfig, TrialSpec

REPO_ROOT = Path(__file__).parents[2]

BASE = TrialSpec(
    backbone="vit_test",
    backbone_args={"img_size": 16, "pretrained": None},
    method="lora",
    method_args={"r": 4, "alpha": 8.0},
    checkpointing="static",
    checkpointing_args={"every": 2},
    dataset="synthetic",
    dataset_args={"num_classes": 4, "images_per_class": 24},
    budget_mb=1024,
    train=TrainConfig(epochs=2, lr=1e-3),
    seed=3,
)

# Built identically in this process and in subprocesses with other hash seeds.
SPECS_SOURCE = """
from orchestrator.spec import TrainConfig, TrialSpec
specs = [
    TrialSpec(),
    TrialSpec(backbone="vit_test", method="lora", method_args={"r": 4, "alpha": 8.0}),
    TrialSpec(backbone="tiny_vit_test", method="bitfit", method_args={"train_norm": True},
              checkpointing="static", checkpointing_args={"every": 2}, seed=7,
              dataset="synthetic", dataset_args={"noise": 0.1, "tags": ["a", "b"],
              "nested": {"z": 1, "a": [1, 2.5, None]}}, budget_mb=512.5),
    TrialSpec(kind="baseline", backbone="vit_test", method="", baseline="zs",
              baseline_args={"k": 5}, train=TrainConfig(epochs=1, precision="bf16")),
]
"""


def _local_specs() -> list[TrialSpec]:
    namespace: dict[str, Any] = {}
    exec(SPECS_SOURCE, namespace)  # noqa: S102 - fixed source shared with the subprocess
    return namespace["specs"]


# ---------------------------------------------------------------- trial_id


def test_trial_id_is_12_lowercase_hex() -> None:
    """The id is a 12-character lowercase hexadecimal string."""
    for spec in [BASE, TrialSpec(), *_local_specs()]:
        assert re.fullmatch(r"[0-9a-f]{12}", spec.trial_id), spec.trial_id


def test_equal_specs_have_equal_ids() -> None:
    """Two specs built separately from equal values are equal, hash equal, share an id."""
    twin = dataclasses.replace(
        BASE,
        method_args=dict(BASE.method_args),
        dataset_args=dict(BASE.dataset_args),
        train=TrainConfig(epochs=2, lr=1e-3),
    )
    assert twin is not BASE
    assert twin == BASE
    assert twin.trial_id == BASE.trial_id
    assert hash(twin) == hash(BASE)
    assert len({twin, BASE}) == 1


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"seed": 4}, id="seed"),
        pytest.param({"method": "full"}, id="method"),
        pytest.param({"method_args": {"r": 8, "alpha": 8.0}}, id="method_args"),
        pytest.param({"budget_mb": 2048}, id="budget_mb"),
        pytest.param({"train": TrainConfig(epochs=2, lr=2e-3)}, id="train-lr"),
        pytest.param(
            {"train": TrainConfig(epochs=2, lr=1e-3, precision="bf16")}, id="train-precision"
        ),
        pytest.param(
            {"dataset_args": {"num_classes": 4, "images_per_class": 25}}, id="dataset_args"
        ),
        pytest.param({"backbone": "tiny_vit_test"}, id="backbone"),
        pytest.param({"checkpointing_args": {"every": 1}}, id="checkpointing_args"),
        pytest.param({"dataset": "digits"}, id="dataset"),
        pytest.param({"kind": "baseline"}, id="kind"),
    ],
)
def test_changing_one_field_changes_the_id(changes: dict[str, Any]) -> None:
    """Every field is part of the identity of a trial."""
    other = dataclasses.replace(BASE, **changes)
    assert other != BASE
    assert other.trial_id != BASE.trial_id


def test_arg_insertion_order_does_not_change_the_id() -> None:
    """{"r": 4, "alpha": 8} and {"alpha": 8, "r": 4} are the same trial."""
    a = TrialSpec(backbone="vit_test", method="lora", method_args={"r": 4, "alpha": 8})
    b = TrialSpec(backbone="vit_test", method="lora", method_args={"alpha": 8, "r": 4})
    assert list(a.method_args) != list(b.method_args)
    assert a.trial_id == b.trial_id
    nested_a = TrialSpec(dataset_args={"x": {"p": 1, "q": 2}, "y": 0})
    nested_b = TrialSpec(dataset_args={"y": 0, "x": {"q": 2, "p": 1}})
    assert nested_a.trial_id == nested_b.trial_id


def test_budget_int_and_float_give_the_same_id() -> None:
    """budget_mb is stored as a float, so 1024 and 1024.0 are one trial."""
    a = TrialSpec(budget_mb=1024)
    b = TrialSpec(budget_mb=1024.0)
    assert isinstance(a.budget_mb, float)
    assert a.trial_id == b.trial_id


@pytest.mark.parametrize("hash_seed", ["123", "999"])
def test_trial_id_is_stable_across_processes(hash_seed: str) -> None:
    """A fresh interpreter with another PYTHONHASHSEED computes the same ids."""
    expected = [s.trial_id for s in _local_specs()]
    code = SPECS_SOURCE + "\nimport json\nprint(json.dumps([s.trial_id for s in specs]))\n"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
    assert len(set(expected)) == len(expected)


# ---------------------------------------------------------------- JSON


def test_json_round_trip_with_nested_args() -> None:
    """from_json(to_json()) gives back an equal spec, TrainConfig included."""
    spec = _local_specs()[2]
    text = spec.to_json()
    back = TrialSpec.from_json(text)
    assert back == spec
    assert isinstance(back.train, TrainConfig)
    assert back.dataset_args["nested"] == {"z": 1, "a": [1, 2.5, None]}
    assert back.trial_id == spec.trial_id
    assert back.to_json() == text


def test_to_json_is_canonical() -> None:
    """Sorted keys, no whitespace: the bytes that the id hashes."""
    text = BASE.to_json()
    assert ", " not in text and ": " not in text
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert data["train"]["lr"] == 1e-3


def test_from_dict_rejects_unknown_fields() -> None:
    """An unknown key is named in the error, not silently dropped."""
    data = BASE.to_dict()
    data["colour"] = "red"
    with pytest.raises(ValueError, match="colour"):
        TrialSpec.from_dict(data)


def test_unknown_kind_is_rejected() -> None:
    """kind is finetune or baseline."""
    with pytest.raises(ValueError, match="kind"):
        TrialSpec(kind="pretrain")


# ---------------------------------------------------------------- TrainConfig


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        pytest.param({"epochs": 0}, "epochs", id="epochs-0"),
        pytest.param({"batch_size": -1}, "batch_size", id="batch_size-negative"),
        pytest.param({"eval_batch_size": 0}, "eval_batch_size", id="eval_batch_size-0"),
        pytest.param({"lr": 0}, "lr", id="lr-0"),
        pytest.param({"lr": -1e-3}, "lr", id="lr-negative"),
        pytest.param({"weight_decay": -0.1}, "weight_decay", id="weight_decay-negative"),
        pytest.param({"precision": "fp8"}, "precision", id="precision-fp8"),
        pytest.param({"optimizer": "adam"}, "optimizer", id="optimizer-adam"),
        pytest.param({"epochs": 2, "warmup_epochs": 3}, "warmup_epochs", id="warmup-gt-epochs"),
        pytest.param({"warmup_epochs": -0.5}, "warmup_epochs", id="warmup-negative"),
        pytest.param({"device": "tpu"}, "device", id="device-tpu"),
        pytest.param({"max_steps": -1}, "max_steps", id="max_steps-negative"),
    ],
)
def test_train_config_rejects_bad_values(kwargs: dict[str, Any], field: str) -> None:
    """ValueError whose message names the field and the value."""
    with pytest.raises(ValueError, match=rf"\b{field} must") as info:
        TrainConfig(**kwargs)
    assert repr(kwargs[field]) in str(info.value)


def test_train_config_reports_every_problem() -> None:
    """Several bad fields are all named in one message."""
    with pytest.raises(ValueError) as info:
        TrainConfig(epochs=0, optimizer="adam")
    assert "epochs" in str(info.value) and "optimizer" in str(info.value)


def test_train_config_accepts_warmup_equal_to_epochs() -> None:
    """The warm-up bound is inclusive."""
    assert TrainConfig(epochs=2, warmup_epochs=2).warmup_epochs == 2
