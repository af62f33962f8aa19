"""A trial's worker process killed from outside (Ray's node out-of-memory killer) or
crashing (a segfault in native code) is a `failed` record naming the cause; the sweep
goes on and exits 1, and nothing is left unrecorded."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.records import RecordStore

pytestmark = pytest.mark.ray

ORCHESTRATE = str(Path(sys.executable).parent / "orchestrate")

SEGFAULT_PLUGIN = '''"""A method whose native code crashes its process (a buggy extension)."""

import ctypes

from workers.methods import METHODS
from workers.registry import NoArgs


@METHODS.register(config_cls=NoArgs)
def crashes(config, model, ctx):
    """Dereferences a null pointer: SIGSEGV."""
    ctypes.string_at(0)
'''


def _run(grid: dict[str, Any], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return subprocess.run(
        [ORCHESTRATE, "run", str(path), "--no-progress"],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _statuses(output: str) -> dict[str, tuple[str, str]]:
    frame = RecordStore(output).collect()
    return {r.method: (r.status, r.error) for r in frame.itertuples()}


def test_workers_killed_by_the_node_oom_killer_are_failed_records(
    tiny_grid: dict[str, Any], tmp_path: Path
) -> None:
    """Ray's own memory monitor, told that 2 % of the node is its limit, kills every trial
    worker (the real killer, not a stand-in); each trial is a record that says so."""
    grid = copy.deepcopy(tiny_grid)
    grid["resources"] = {"cpus_per_trial": 1, "max_concurrent": 2, "max_retries": 0}
    done = _run(
        grid, tmp_path, RAY_memory_usage_threshold="0.02", RAY_memory_monitor_refresh_ms="100"
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "2 trial(s) failed" in done.stderr
    statuses = _statuses(grid["output"])
    assert set(statuses) == {"full", "bitfit"}
    for status, error in statuses.values():
        assert status == "failed"
        assert "killed due to the node running low on memory" in error


def test_a_worker_that_segfaults_is_a_failed_record_and_the_sweep_goes_on(
    tiny_grid: dict[str, Any], tmp_path: Path
) -> None:
    (tmp_path / "crash_ext.py").write_text(SEGFAULT_PLUGIN)
    grid = copy.deepcopy(tiny_grid)
    grid["plugins"] = ["./crash_ext.py"]
    grid["methods"] = {"full": {}, "crashes": {}}
    grid["resources"] = {"cpus_per_trial": 1, "max_concurrent": 2, "max_retries": 0}
    done = _run(grid, tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    statuses = _statuses(grid["output"])
    assert statuses["full"][0] == "ok"
    status, error = statuses["crashes"]
    assert status == "failed"
    assert error.startswith("ray: ") and "died" in error.lower()
