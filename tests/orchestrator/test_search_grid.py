"""The shipped ``grid/search.yaml``: its limits do not depend on the machine's load (peak
memory accounted against the budget, energy estimated from the trial's CPU time), so it
finds feasible trials while another sweep runs beside it on the same cores."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.grid import load_grid
from orchestrator.records import RecordStore

ROOT = Path(__file__).resolve().parents[2]
ORCHESTRATE = str(Path(sys.executable).with_name("orchestrate"))


def _shipped(name: str, output: Path, **changes: Any) -> Path:
    raw = yaml.safe_load((ROOT / "grid" / name).read_text())
    raw.update(output=str(output), **changes)
    path = output.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_shipped_search_limits_are_load_independent() -> None:
    grid = load_grid(str(ROOT / "grid" / "search.yaml"), max_trials=None)
    assert grid.search is not None
    assert "train_time_s" not in grid.search.limits  # wall time: no limit of a shared machine
    assert grid.energy["meter"] == "estimate"  # CPU time x watts, not a machine-wide counter
    assert grid.search.trials == 30


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 30 trials on 2 cores shared with a sweep: 15-30 min loaded
def test_shipped_search_finds_feasible_trials_beside_another_sweep(tmp_path: Path) -> None:
    """Many minutes on 2 cores: the 30 trials of grid/search.yaml, while the smoke grid
    (36 trials of 4 epochs, 2 at once) trains beside it."""
    search = _shipped("search.yaml", tmp_path / "search")
    beside = _shipped("smoke.yaml", tmp_path / "smoke", seeds=[0, 1, 2])
    sweep = subprocess.Popen(
        [ORCHESTRATE, "run", str(beside), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        started = time.monotonic()
        done = subprocess.run(
            [ORCHESTRATE, "search", str(search), "--no-dashboard"],
            capture_output=True,
            text=True,
        )
        took = time.monotonic() - started
        beside_running = sweep.poll() is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            sweep.terminate()
        sweep.wait(timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert beside_running, "the other sweep ended before the search: it did not run beside it"
    result = json.loads((tmp_path / "search" / "search.json").read_text())
    assert result["best"], done.stdout[-3000:]
    records = RecordStore(tmp_path / "search").collect()
    feasible = records[(records["status"] == "ok") & (records["peak_mem_mb"] <= 16)]
    assert len(feasible) >= 1
    smoke = RecordStore(tmp_path / "smoke").collect()
    ran = next(line for line in done.stdout.splitlines() if line.startswith("ran "))
    print(f"\n{ran}\n" + done.stdout[done.stdout.index("Feasible Pareto set") :])
    print(
        f"search: {sum(result['outcomes'].values())} trials in {took:.0f} s, "
        f"{len(result['best'])} in the feasible Pareto set; outcomes {result['outcomes']}; "
        f"beside it the smoke sweep recorded {len(smoke)} trials"
    )
