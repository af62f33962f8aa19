"""End to end through Ray: `orchestrate run` on a 2-trial grid, then a resume that runs nothing."""

from __future__ import annotations

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
    # tiny_vit_test names weights that do not exist: its trials fail inside the worker;
    # vit_test at 0.25 MB is over budget; vit_test at 2048 MB is fine
    tiny_grid["backbones"] = {
        "vit_test": {"img_size": 16},
        "tiny_vit_test": {"pretrained": str(tmp_path / "missing.pth")},
    }
    tiny_grid["methods"] = {"full": {}}
    tiny_grid["budget_mb"] = [0.25, 2048]
    path = write_grid(tiny_grid)
    assert main(["run", str(path), "--no-progress"]) == 1
    assert "2 trial(s) failed" in capsys.readouterr().err
    frame = RecordStore(tiny_grid["output"]).collect()
    status = {(r.backbone, r.budget_mb): r.status for r in frame.itertuples()}
    assert status == {
        ("vit_test", 0.25): "over_budget",
        ("vit_test", 2048.0): "ok",
        ("tiny_vit_test", 0.25): "failed",
        ("tiny_vit_test", 2048.0): "failed",
    }
    failed = frame[frame["status"] == "failed"]
    assert failed["error"].str.contains("missing.pth").all()

    # --retry-failed re-runs exactly the failed ones (they fail again, nothing else runs)
    assert main(["run", str(path), "--no-progress", "--retry-failed"]) == 1
    assert "4 trials, 2 already recorded, 2 to run" in capsys.readouterr().out


def test_control_plane_imports_no_torch() -> None:
    code = (
        "import sys; import orchestrator.cli, orchestrator.tune_driver, orchestrator.report; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
