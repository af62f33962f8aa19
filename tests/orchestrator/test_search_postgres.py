"""Several ``orchestrate search`` drivers on one study through a real PostgreSQL server:
one is killed (SIGKILL) with a trial in flight, the other fails that trial once its
heartbeat is stale, asks it again and finishes the study; every trial is told once."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from orchestrator.records import RecordStore
from orchestrator.search import HEARTBEAT_ENV
from tests.postgres_server import PostgresServer, PostgresUnavailable

ORCHESTRATE = str(Path(sys.executable).with_name("orchestrate"))
MARKER = "VRAMSWEEP_TEST_PG_DRIVER"  # in the environment of a driver and its Ray
TRIALS = 4
TOLD = re.compile(r"^\[\d+/\d+\] #(\d+) ", re.M)  # a driver's line per trial told


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer.start()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc))
    with server:
        yield server


@contextlib.contextmanager
def _driver(grid: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``orchestrate search GRID`` (heartbeat every second); whatever of it and its Ray is
    left at the end is killed."""
    marker = uuid.uuid4().hex
    env = {**os.environ, MARKER: marker, HEARTBEAT_ENV: "1", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [ORCHESTRATE, "search", str(grid), "--no-dashboard"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _processes_of(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _processes_of(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if f"{MARKER}={marker}".encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
    return pids


def _wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


@pytest.mark.ray  # each driver starts its own local Ray
def test_two_drivers_share_a_study_and_one_survives_the_others_death(
    tmp_path: Path, tiny_grid: dict[str, Any], postgres: PostgresServer
) -> None:
    url = postgres.create_database("search")
    tiny_grid["train"] = {"epochs": 1, "batch_size": 16, "max_steps": 20}  # seconds
    tiny_grid["resources"]["max_concurrent"] = 1
    tiny_grid["search"] = {
        "space": {"train": {"lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}},
        "trials": TRIALS,
        "sampler": "random",
        "n_parallel": 1,
        "storage": url,
        "study": "shared",
    }
    grids, logs = {}, {}
    for seed, name in enumerate(("a", "b")):  # one study; each driver its output, its seed
        grid = dict(tiny_grid, output=str(tmp_path / name))
        grid["search"] = dict(tiny_grid["search"], seed=seed)
        grids[name] = tmp_path / f"{name}.yaml"
        grids[name].write_text(yaml.safe_dump(grid, sort_keys=False))
        logs[name] = tmp_path / f"{name}.log"

    with _driver(grids["a"], logs["a"]) as a, _driver(grids["b"], logs["b"]) as b:
        study = _wait_for(lambda: _study(url), 120, "the study")

        def running_in_a() -> list[optuna.trial.FrozenTrial]:
            assert a.poll() is None, logs["a"].read_text()[-2000:]
            return [
                t
                for t in study.get_trials(states=[optuna.trial.TrialState.RUNNING])
                if t.user_attrs.get("driver", "").endswith(f":{a.pid}")
                and t.user_attrs.get("trial_id")
            ]

        (killed,) = _wait_for(running_in_a, 120, "a trial in flight in driver a")
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
        assert b.wait(timeout=180) == 0, logs["b"].read_text()[-3000:]

    trials = study.get_trials()
    states = collections.Counter(t.state for t in trials)
    assert (
        not states[optuna.trial.TrialState.RUNNING] and not states[optuna.trial.TrialState.WAITING]
    )
    counted = [t for t in trials if "outcome" in t.user_attrs]
    assert len(counted) == TRIALS, [(t.number, t.state, t.user_attrs) for t in trials]
    # the killed trial: failed by the survivor (no outcome), then asked again and told by it
    lost = study.trials[killed.number]
    assert lost.state == optuna.trial.TrialState.FAIL and "outcome" not in lost.user_attrs
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
    assert retry.params == lost.params and retry in counted
    assert retry.user_attrs["driver"].endswith(f":{b.pid}")

    # told exactly once: every counted trial in one driver's output, once
    told = collections.Counter(
        int(n) for name in ("a", "b") for n in TOLD.findall(logs[name].read_text())
    )
    assert told == collections.Counter(t.number for t in counted)
    # each trial that ran has its one record, in the output of the driver that ran it
    ran = [t for t in counted if t.user_attrs["outcome"] == "ran"]
    recorded = {name: RecordStore(tmp_path / name).existing_ids() for name in ("a", "b")}
    for t in ran:
        folder = "a" if t.user_attrs["driver"].endswith(f":{a.pid}") else "b"
        assert t.user_attrs["trial_id"] in recorded[folder]
    assert "Feasible Pareto set (best first):" in logs["b"].read_text()


def _study(url: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name="shared", storage=url)
    except KeyError:  # not created yet
        return None
