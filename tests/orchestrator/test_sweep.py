"""End to end through Ray: `orchestrate run` on a 2-trial grid, then a resume that runs nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from orchestrator.cli import main
from orchestrator.expansion import expand
from orchestrator.grid import load_grid
from orchestrator.records import RecordStore
from tests.dataset_files import write_cifar

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def _ray_shutdown():  # noqa: ANN202 - one local Ray for the module, stopped afterwards
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def test_sweep_records_reports_and_resumes(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_grid(tiny_grid)
    ids = {s.trial_id for s in expand(load_grid(path))}
    assert len(ids) == 2

    assert main(["run", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 trials, 0 already recorded, 2 to run" in out
    assert "Pareto front" in out

    store = RecordStore(tiny_grid["output"])
    frame = store.collect()
    assert set(frame["trial_id"]) == ids
    assert (frame["status"] == "ok").all()
    assert frame["accuracy"].between(0, 1).all()
    assert set(frame["method"]) == {"full", "bitfit"}
    assert (frame["params_trainable"] < frame["params_total"]).sum() == 1  # bitfit
    assert frame["host"].str.len().gt(0).all() and frame["git_sha"].str.len().gt(0).all()
    out_dir = Path(tiny_grid["output"])
    for name in ("report.html", "pareto.png", "report.md", "grid.yaml"):
        assert (out_dir / name).stat().st_size > 0, name
    assert "data:image/png;base64," in (out_dir / "report.html").read_text()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out_dir / "records").iterdir()}
    tune_files = [p.name for p in (out_dir / "_tune").rglob("*") if p.is_file()]
    assert tune_files.count("result.json") == tune_files.count("progress.csv") == 2
    assert not [n for n in tune_files if n.startswith("events.out")]  # tracking: tensorboard

    # the same grid again: nothing re-runs, the records are untouched
    assert main(["run", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 trials, 2 already recorded, 0 to run" in out
    assert {p.name: p.stat().st_mtime_ns for p in (out_dir / "records").iterdir()} == mtimes

    # collect writes the whole table
    table = out_dir / "all.csv"
    assert main(["collect", str(out_dir), "--out", str(table)]) == 0
    assert set(pd.read_csv(table)["trial_id"]) == ids


def test_failures_are_records_and_the_sweep_goes_on(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # tiny_vit_test names a weights file that is no checkpoint (validation sees it
    # exists; loading it fails inside the worker); vit_test at 0.25 MB is over budget;
    # vit_test at 2048 MB is fine
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    tiny_grid["backbones"] = {
        "vit_test": {"img_size": 16},
        "tiny_vit_test": {"pretrained": str(tmp_path / "broken.pth")},
    }
    tiny_grid["methods"] = {"full": {}}
    tiny_grid["budget_mb"] = [0.25, 2048]
    path = write_grid(tiny_grid)
    assert main(["run", str(path), "--no-progress"]) == 1
    assert "1 trial(s) failed" in capsys.readouterr().err
    frame = RecordStore(tiny_grid["output"]).collect()
    status = {(r.backbone, r.budget_mb): r.status for r in frame.itertuples()}
    assert status == {
        ("vit_test", 0.25): "over_budget",
        ("vit_test", 2048.0): "ok",
        # refused before it allocates (or loads weights): its least memory is > 0.25 MB
        ("tiny_vit_test", 0.25): "over_budget",
        ("tiny_vit_test", 2048.0): "failed",
    }
    failed = frame[frame["status"] == "failed"]
    assert failed["error"].str.contains("broken.pth: refused by weights-only loading").all()

    # --retry-failed re-runs exactly the failed ones (they fail again, nothing else runs)
    assert main(["run", str(path), "--no-progress", "--retry-failed"]) == 1
    assert "4 trials, 3 already recorded, 1 to run" in capsys.readouterr().out


def test_trials_read_the_shared_dataset_not_the_disk(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from workers import data

    write_cifar(tmp_path / "data")
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    real_load = data.load_source
    loads = []

    def load_then_remove(name: str, args: dict | None) -> tuple[data.ImageData, str]:
        # once the driver has the dataset, neither its files nor a decoded copy remain
        # on disk: a trial that read the disk would fail
        loads.append(name)
        out = real_load(name, args)
        shutil.rmtree(tmp_path / "data")
        shutil.rmtree(tmp_path / "cache")
        return out

    monkeypatch.setattr(data, "load_source", load_then_remove)
    tiny_grid["datasets"] = {
        "cifar100": {"root": str(tmp_path / "data"), "val_fraction": 0.25, "augment": True}
    }
    tiny_grid["train"] = {"epochs": 1, "batch_size": 4, "max_steps": 2}
    assert main(["run", str(write_grid(tiny_grid)), "--no-progress"]) == 0
    frame = RecordStore(tiny_grid["output"]).collect()
    assert loads == ["cifar100"]  # once for the sweep, not once per trial
    assert len(frame) == 2 and (frame["status"] == "ok").all(), frame["error"].tolist()
    assert (frame["data_source"] == "object_store").all()
    # 3 classes x 4 training images, one per class held out for validation
    assert (frame["train_images"] == 9).all() and frame["val_accuracy"].between(0, 1).all()
    assert frame["data_wait_s"].ge(0).all()


def test_shared_dataset_is_mapped_not_copied(tiny_grid: dict[str, Any]) -> None:
    import numpy as np
    import ray

    from orchestrator.tune_driver import connect
    from workers.data import from_shared, load_dataset, to_shared

    connect()
    data = load_dataset("synthetic", tiny_grid["datasets"]["synthetic"])
    shared = ray.get(ray.put(to_shared(data)))
    assert isinstance(shared["train_x"], np.ndarray) and not shared["train_x"].flags.writeable
    view = from_shared(shared)
    # the tensor is the object store's memory itself, and equal to what was put there
    assert view.train_x.data_ptr() == shared["train_x"].ctypes.data
    assert view.train_x.data_ptr() != data.train_x.data_ptr()
    assert all(
        (getattr(view, f) == getattr(data, f)).all() for f in ("train_x", "train_y", "test_x")
    )
    assert (view.mean, view.std, view.classes) == (data.mean, data.std, data.classes)


def test_control_plane_imports_no_torch() -> None:
    code = (
        "import sys; import orchestrator.cli, orchestrator.tune_driver, orchestrator.report; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
