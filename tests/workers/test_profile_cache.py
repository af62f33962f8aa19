"""The block-profile cache: reused by the next trial of the same key, never trusted blindly."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from orchestrator.spec import TrainConfig, TrialSpec
from workers.backbones import create_backbone
from workers.checkpointing import profile_blocks
from workers.data import CACHE_ENV, ImageData
from workers.profile_cache import PROFILE_FORMAT, ProfileCache
from workers.trial import run_trial

QUICK = TrainConfig(epochs=1, batch_size=16, lr=1e-3, max_steps=3)
SYNTH = {"num_classes": 4, "images_per_class": 24, "image_size": 16}


def _spec(checkpointing: str, train: TrainConfig = QUICK) -> TrialSpec:
    return TrialSpec(
        backbone="vit_test",
        method="lora",
        dataset="synthetic",
        dataset_args=SYNTH,
        train=train,
        budget_mb=2048,
        checkpointing=checkpointing,
    )


def _adaptive_entry(folder: Path) -> Path:
    (path,) = [p for p in folder.glob("*.json") if json.loads(p.read_text())["key"]["timed"]]
    return path


def test_second_trial_of_a_key_reads_the_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic_data: ImageData
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    static = run_trial(_spec("static"), num_threads=1, data=synthetic_data)
    cold = run_trial(_spec("adaptive"), num_threads=1, data=synthetic_data)
    warm = run_trial(_spec("adaptive"), num_threads=1, data=synthetic_data)
    assert static.status == cold.status == warm.status == "ok", (cold.error, warm.error)
    assert static.ckpt_profile_cached is False and static.ckpt_profile_s > 0
    assert cold.ckpt_profile_cached is False and cold.ckpt_profile_s > 0
    assert warm.ckpt_profile_cached is True and warm.ckpt_profile_s == 0.0
    assert warm.ckpt_plan == cold.ckpt_plan
    assert warm.ckpt_recompute_ms == pytest.approx(cold.ckpt_recompute_ms)
    assert cold.first_step_s > cold.ckpt_profile_s  # profiling runs inside the first step
    # the cached trial starts as fast as static's (which profiles bytes only): a
    # generous ratio against the baseline measured here, machine noise included
    assert warm.first_step_s / static.first_step_s < 2.0
    assert warm.first_step_s < cold.first_step_s


def test_corrupt_entry_is_measured_again_and_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic_data: ImageData
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    first = run_trial(_spec("adaptive"), num_threads=1, data=synthetic_data)
    path = _adaptive_entry(tmp_path / "profiles")
    path.write_text('{"format": 1, "key": ')  # torn
    again = run_trial(_spec("adaptive"), num_threads=1, data=synthetic_data)
    assert again.ckpt_profile_cached is False and again.ckpt_profile_s > 0
    assert again.ckpt_plan == first.ckpt_plan
    assert json.loads(path.read_text())["format"] == PROFILE_FORMAT  # rewritten whole


def test_another_batch_size_misses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic_data: ImageData
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    run_trial(_spec("adaptive"), num_threads=1, data=synthetic_data)
    other = run_trial(
        _spec("adaptive", replace(QUICK, batch_size=8)), num_threads=1, data=synthetic_data
    )
    assert other.ckpt_profile_cached is False and other.ckpt_profile_s > 0
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 2


# ---------------------------------------------------------------- validation on read


@pytest.fixture
def model_and_profile():  # noqa: ANN201
    torch.manual_seed(0)
    model = create_backbone("vit_test", num_classes=4, img_size=16).train()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
    return model, profile_blocks(model, lambda: F.cross_entropy(model(x), y), timed=False)


def test_entry_round_trips(tmp_path: Path, model_and_profile) -> None:  # noqa: ANN001
    model, profile = model_and_profile
    cache = ProfileCache({"batch_shape": [4, 3, 16, 16]}, tmp_path)
    assert cache.load(model) is None
    cache.store(model, profile)
    assert cache.load(model) == profile


@pytest.mark.parametrize(
    ("field", "value"),
    [("format", 0), ("key", {"batch_shape": [8, 3, 16, 16]}), ("chain", ["blocks.0"])],
)
def test_foreign_or_stale_entry_is_ignored(  # noqa: ANN001
    tmp_path: Path, model_and_profile, field: str, value: object
) -> None:
    model, profile = model_and_profile
    cache = ProfileCache({"batch_shape": [4, 3, 16, 16]}, tmp_path)
    cache.store(model, profile)
    entry = json.loads(cache.path.read_text())
    cache.path.write_text(json.dumps(entry | {field: value}))
    assert cache.load(model) is None


def test_entry_of_another_model_is_ignored(tmp_path: Path, model_and_profile) -> None:  # noqa: ANN001
    model, profile = model_and_profile
    cache = ProfileCache({"batch_shape": [4, 3, 16, 16]}, tmp_path)
    cache.store(model, profile)
    deeper = create_backbone("vit_test", num_classes=4, img_size=16, model_args={"depth": 6})
    assert cache.load(deeper) is None


def test_key_names_the_worker_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry measured by other worker code (another digest) is another key: a miss."""
    from workers import profile_cache

    key = profile_cache.trial_key(_spec("adaptive"), (16, 3, 16, 16), "float32", "cpu", True)
    assert key["code"] == profile_cache.code_digest()
    assert len(key["code"]) == 16
    other = {**key, "code": "0" * 16}
    assert ProfileCache(key, tmp_path).path != ProfileCache(other, tmp_path).path
    profile_cache.code_digest.cache_clear()
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(profile_cache, "__file__", str(package / "profile_cache.py"))
    first = profile_cache.code_digest()
    profile_cache.code_digest.cache_clear()
    (package / "a.py").write_text("x = 2\n")
    assert profile_cache.code_digest() != first  # an edit is another digest
    profile_cache.code_digest.cache_clear()
