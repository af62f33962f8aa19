"""A real multi-node Ray cluster on this machine, and faults injected into it.

One head (no CPUs: it schedules nothing) and two worker nodes of one CPU each are
started with ``ray start``; sweeps join them with ``--address``. Faults: a trial's
worker process SIGKILLed, the driver SIGKILLed mid-sweep and resumed, a node whose
raylet dies mid-trial. In each case every trial ends with exactly one record.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from orchestrator.cli import main
from orchestrator.records import RecordStore
from orchestrator.tune_driver import connect

pytestmark = pytest.mark.ray

RAY = str(Path(sys.executable).parent / "ray")
ORCHESTRATE = str(Path(sys.executable).parent / "orchestrate")
TRIAL_TITLE = "ray::ImplicitFunc"  # process title of a worker running a Tune trial


@dataclass
class Cluster:
    address: str
    temp_dir: str
    nodes: dict[str, str]  # custom resource naming the node -> its Ray node id


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes() -> Iterator[tuple[int, str]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                yield int(entry.name), (entry / "cmdline").read_bytes().decode(errors="replace")


def _ray_start(*args: str) -> None:
    # a joining node uses token authentication only when told to (the head turns it
    # on by itself when ~/.ray/auth_token exists)
    env = dict(os.environ, RAY_AUTH_MODE="token")
    subprocess.run(
        [RAY, "start", "--disable-usage-stats", *args],
        check=True,
        capture_output=True,
        timeout=120,
        env=env,
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths
    port = _free_port()
    address = f"127.0.0.1:{port}"
    try:
        _ray_start(
            "--head",
            f"--port={port}",
            "--num-cpus=0",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-port={_free_port()}",
        )
        for node in ("node_a", "node_b"):
            _ray_start(f"--address={address}", "--num-cpus=1", f'--resources={{"{node}": 1}}')
        connect(address)
        nodes = {
            name: n["NodeID"]
            for n in ray.nodes()
            for name in ("node_a", "node_b")
            if n["Alive"] and name in n["Resources"]
        }
        ray.shutdown()
        assert len(nodes) == 2
        yield Cluster(address, temp_dir, nodes)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        # stop this cluster's processes only (others may run Ray beside it)
        for pid, cmdline in _processes():
            if temp_dir in cmdline or f"--gcs-address={address}" in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _grid(tiny_grid: dict[str, Any], steps: int, seeds: list[int]) -> dict[str, Any]:
    tiny_grid["methods"] = {"full": {}}
    tiny_grid["seeds"] = seeds
    tiny_grid["train"] = {"epochs": 1000, "batch_size": 16, "max_steps": steps}
    return tiny_grid


def _kill_when(condition: Callable[[], int | None], timeout: float = 120) -> threading.Thread:
    """In the background: wait until ``condition()`` names a pid, then SIGKILL it."""

    def run() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = condition()
            if pid:
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _trial_workers() -> list[int]:
    return [pid for pid, cmd in _processes() if cmd.startswith(TRIAL_TITLE)]


def _one_record_per_trial(output: str, n: int) -> Any:
    frame = RecordStore(output).collect()
    assert len(frame) == n and frame["trial_id"].is_unique
    files = (Path(output) / "records").glob("*.parquet")  # a group commit's part holds several
    assert sum(pq.read_metadata(f).num_rows for f in files) == n  # none written twice
    return frame


def test_trials_run_on_both_nodes(
    cluster: Cluster, tiny_grid: dict[str, Any], write_grid: Callable[[dict[str, Any]], Path]
) -> None:
    grid = _grid(tiny_grid, steps=60, seeds=[0, 1, 2, 3])
    path = write_grid(grid)
    assert main(["run", str(path), "--address", cluster.address, "--no-progress"]) == 0
    frame = _one_record_per_trial(grid["output"], 4)
    assert (frame["status"] == "ok").all(), frame["error"].tolist()
    assert set(frame["node_id"]) == set(cluster.nodes.values())
    assert (frame["attempt"] == 1).all()


def test_killed_trial_worker_is_retried_once_recorded(
    cluster: Cluster, tiny_grid: dict[str, Any], write_grid: Callable[[dict[str, Any]], Path]
) -> None:
    grid = _grid(tiny_grid, steps=400, seeds=[0, 1])
    path = write_grid(grid)
    workers = _trial_workers
    killer = _kill_when(lambda: workers()[0] if len(workers()) == 2 else None)
    assert main(["run", str(path), "--address", cluster.address, "--no-progress"]) == 0
    killer.join(timeout=1)
    frame = _one_record_per_trial(grid["output"], 2)
    assert (frame["status"] == "ok").all(), frame["error"].tolist()
    assert sorted(frame["attempt"]) == [1, 2]  # the killed one ran again, from scratch
    assert (frame["steps"] == 400).all()


def test_killed_driver_resumes_with_every_trial_recorded_once(
    cluster: Cluster, tiny_grid: dict[str, Any], write_grid: Callable[[dict[str, Any]], Path]
) -> None:
    grid = _grid(tiny_grid, steps=150, seeds=[0, 1, 2, 3, 4, 5])
    grid["resources"]["max_concurrent"] = 1
    path = write_grid(grid)
    records = Path(grid["output"]) / "records"
    driver = subprocess.Popen(
        [ORCHESTRATE, "run", str(path), "--no-progress", "--address", cluster.address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(list(records.glob("*.parquet"))) < 2:
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    before = {p.name: p.stat().st_mtime_ns for p in records.glob("*.parquet")}
    assert 2 <= len(before) < 6, "the driver was to be killed mid-sweep"
    assert main(["run", str(path), "--resume", "--address", cluster.address, "--no-progress"]) == 0
    frame = _one_record_per_trial(grid["output"], 6)
    assert (frame["status"] == "ok").all(), frame["error"].tolist()
    after = {p.name: p.stat().st_mtime_ns for p in records.glob("*.parquet")}
    assert {k: after[k] for k in before} == before  # recorded trials did not run again


def test_trial_of_a_node_that_leaves_is_rescheduled(
    cluster: Cluster, tiny_grid: dict[str, Any], write_grid: Callable[[dict[str, Any]], Path]
) -> None:
    # last in this module: node_a is gone afterwards
    grid = _grid(tiny_grid, steps=400, seeds=[0, 1])
    path = write_grid(grid)

    def raylet_of_node_a() -> int | None:
        if len(_trial_workers()) < 2:  # both trials started: one of them is on node_a
            return None
        return next(
            (p for p, cmd in _processes() if "raylet" in cmd and "node_a" in cmd),
            None,
        )

    killer = _kill_when(raylet_of_node_a)
    assert main(["run", str(path), "--address", cluster.address, "--no-progress"]) == 0
    killer.join(timeout=1)
    frame = _one_record_per_trial(grid["output"], 2)
    assert (frame["status"] == "ok").all(), frame["error"].tolist()
    retried = frame[frame["attempt"] == 2]
    assert len(retried) == 1
    assert retried["node_id"].iloc[0] == cluster.nodes["node_b"]
