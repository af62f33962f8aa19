"""Command line: shorthand, dry run, user errors without tracebacks, report from records."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import main
from orchestrator.expansion import expand
from orchestrator.grid import load_grid
from orchestrator.records import RecordStore, TrialRecord


def test_grid_alone_means_run_and_dry_run_runs_nothing(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_grid(tiny_grid)
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 trials, 0 already recorded, 2 to run" in out
    for spec in expand(load_grid(path)):
        assert spec.trial_id in out
    assert RecordStore(tiny_grid["output"]).existing_ids() == set()


def test_dry_run_counts_what_is_already_recorded(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_grid(tiny_grid)
    first, second = expand(load_grid(path))
    RecordStore(tiny_grid["output"]).write(TrialRecord(spec=first, status="ok", accuracy=0.5))
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 trials, 1 already recorded, 1 to run" in out
    assert second.trial_id in out and first.trial_id not in out


@pytest.mark.parametrize("command", ["collect", "report"])
def test_missing_sweep_folder_is_a_user_error(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "no records folder" in err and "Traceback" not in err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "orchestrate" in capsys.readouterr().out


def test_report_from_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.spec import TrialSpec

    store = RecordStore(tmp_path)
    for seed, (acc, mem) in enumerate([(0.9, 50.0), (0.8, 20.0), (0.7, 30.0)]):
        spec = TrialSpec(backbone="vit_test", method="lora", seed=seed)
        store.write(
            TrialRecord(
                spec=spec, status="ok", accuracy=acc, peak_mem_mb=mem, mem_source="accounted"
            )
        )
    store.write(
        TrialRecord(
            spec=TrialSpec(backbone="vit_test", seed=9), status="failed", error="RuntimeError: boom"
        )
    )
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "status {'ok': 3, 'failed': 1}" in out
    md = (tmp_path / "report.md").read_text()
    # the front is taken over seed means: one configuration, 0.8 ± 0.1 at 33.33 MiB
    front = md.split("## Pareto analysis")[1].split("### ")[1]
    assert "0.8 ± 0.1" in front and "33.33" in front and "0.9" not in front
    assert "1 of 1 configurations on the front" in out and "0.8 ± 0.1" in out
    html = (tmp_path / "report.html").read_text()
    assert "RuntimeError: boom" in html  # failures are shown, not hidden
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
