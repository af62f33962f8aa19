"""Process faults on the real ``orchestrate`` command: SIGINT and SIGTERM, two drivers on
one output, an output that cannot be written mid-sweep; and what a local Ray exposes.

Each driver is a subprocess with its own local Ray. Every process it starts (Ray's
included) inherits a marker in its environment, by which the tests find what is left
of a run and read the sockets its processes listen on.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import main
from orchestrator.expansion import expand
from orchestrator.grid import load_grid
from orchestrator.lock import LOCK_FILE
from orchestrator.records import RecordStore, TrialRecord

pytestmark = pytest.mark.ray

ORCHESTRATE = str(Path(sys.executable).parent / "orchestrate")
MARKER = "VRAMSWEEP_TEST_RUN"


@pytest.fixture(scope="module", autouse=True)
def _ray_shutdown():  # noqa: ANN202 - re-runs in this process start a local Ray: stop it
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ---------------------------------------------------------------- helpers


def _grid(tiny_grid: dict[str, Any], seeds: int = 3, steps: int = 40) -> dict[str, Any]:
    """``seeds`` trials, one at a time: a signal always finds some still to run."""
    tiny_grid["methods"] = {"full": {}}
    tiny_grid["seeds"] = list(range(seeds))
    tiny_grid["train"] = {"epochs": 1000, "batch_size": 16, "max_steps": steps}
    tiny_grid["resources"]["max_concurrent"] = 1
    return tiny_grid


@contextlib.contextmanager
def _driver(tmp_path: Path, *args: str, **env: str) -> Iterator[subprocess.Popen]:
    """``orchestrate ARGS`` with a marker of its own (``proc.marker``); whatever of it is
    left at the end is killed."""
    marker = uuid.uuid4().hex
    name = f"driver-{marker[:8]}"
    proc = subprocess.Popen(
        [ORCHESTRATE, *args],
        env={**os.environ, MARKER: marker, **env},
        stdout=open(tmp_path / f"{name}.out", "w"),  # noqa: SIM115 - closed with the process
        stderr=open(tmp_path / f"{name}.err", "w"),  # noqa: SIM115
    )
    proc.marker, proc.out, proc.err = marker, tmp_path / f"{name}.out", tmp_path / f"{name}.err"
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
    """Live processes whose environment carries ``marker`` (a driver and its Ray)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if f"{MARKER}={marker}".encode() in (entry / "environ").read_bytes():
                    if b"State:\tZ" not in (entry / "status").read_bytes():
                        pids.append(int(entry.name))
    return pids


def _wait_for(condition: Callable[[], Any], timeout: float = 240, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what or condition}")


def _records(output: Path) -> list[Path]:
    return sorted((output / "records").glob("*.parquet"))


def _one_valid_record_per_trial(grid_path: Path) -> set[str]:
    ids = {s.trial_id for s in expand(load_grid(grid_path))}
    store = RecordStore(load_grid(grid_path).output)
    assert store.existing_ids() == ids and not store.quarantined
    assert {p.stem for p in _records(Path(store.output))} == ids
    frame = store.collect()
    assert sorted(frame["trial_id"]) == sorted(ids) and (frame["status"] == "ok").all()
    return ids


def _listening(marker: str) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket the marked processes listen on."""
    inodes: dict[str, str] = {}
    for pid in _processes_of(marker):
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes[target[8:-1]] = name
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                hex_ip, hex_port = fields[1].split(":")
                found.add((str(_address(hex_ip)), int(hex_port, 16), inodes[fields[9]]))
    return found


def _address(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_ip)  # /proc/net/tcp*: 32-bit words in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _interrupt(proc: subprocess.Popen, signum: int, output: Path) -> float:
    """Send ``signum`` once the first record exists; the seconds until the driver exited."""
    _wait_for(lambda: _records(output) or proc.poll() is not None, what="a first record")
    assert proc.poll() is None, proc.err.read_text()[-3000:]
    sent = time.monotonic()
    proc.send_signal(signum)
    proc.wait(timeout=120)
    return time.monotonic() - sent


# ---------------------------------------------------------------- signals


def _gcs_of(marker: str) -> bool:
    """Whether the marked run's Ray has begun to start: its GCS server is up."""
    for pid in _processes_of(marker):
        with contextlib.suppress(OSError):
            if b"gcs_server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_while_ray_starts_beside_validation_stops_the_command_cleanly(
    signum: int,
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    tmp_path: Path,
) -> None:
    """Sent as soon as the command's Ray begins to start, while its grid is still
    validated beside it (``orchestrator.early_ray``): the command's own stop (no exit
    by Ray's SIGTERM handler, status 15), nothing written, nothing of it left."""
    grid = _grid(tiny_grid)
    with _driver(tmp_path, "run", str(write_grid(grid)), "--no-progress") as proc:
        _wait_for(lambda: _gcs_of(proc.marker) or proc.poll() is not None, what="Ray's GCS")
        assert proc.poll() is None, proc.err.read_text()[-3000:]
        proc.send_signal(signum)
        proc.wait(timeout=120)
        gone = _wait_for(lambda: not _processes_of(proc.marker), 30, "the run's processes to end")
    err = proc.err.read_text()
    assert proc.returncode == 128 + signum, err[-3000:]
    assert f"interrupted ({signal.Signals(signum).name})" in err and "Traceback" not in err
    assert gone
    assert not Path(grid["output"]).exists()


def test_sigint_stops_the_sweep_and_the_saved_grid_resumes_it(
    tiny_grid: dict[str, Any], write_grid: Callable[[dict[str, Any]], Path], tmp_path: Path
) -> None:
    grid = _grid(tiny_grid)
    output = Path(grid["output"])
    sockets: set[tuple[str, int, str]] = set()
    with _driver(tmp_path, "run", str(write_grid(grid)), "--no-progress") as proc:

        def first_record_while_reading_sockets() -> bool:
            sockets.update(_listening(proc.marker))
            return bool(_records(output)) or proc.poll() is not None

        _wait_for(first_record_while_reading_sockets, what="a first record")
        seconds = _interrupt(proc, signal.SIGINT, output)
        gone = _wait_for(lambda: not _processes_of(proc.marker), 30, "the run's processes to end")
    out, err = proc.out.read_text(), proc.err.read_text()
    print(f"SIGINT to exit: {seconds:.1f} s")  # noqa: T201 - reported with -s
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted (SIGINT)" in err and "run the same command again to resume" in err
    assert "Tuner.restore" not in out + err and "Traceback" not in err
    assert gone  # no worker (ray::...), raylet or GCS of this run is left
    recorded = {p.name: p.stat().st_mtime_ns for p in _records(output)}
    assert 1 <= len(recorded) < 3, "the signal was to come mid-sweep"
    assert RecordStore(output).existing_ids() == {Path(n).stem for n in recorded}
    assert f"stopped: recorded {len(recorded)} of 3 trials" in out
    assert not (output / "report.html").exists()  # no report of a partial sweep
    # the local Ray listened on loopback only (its gRPC, dashboard and metrics endpoints)
    assert any("dashboard" in name for _, _, name in sockets) or len(sockets) >= 3, sockets
    assert all(_loopback(address) for address, _, _ in sockets), sockets
    assert "Ray dashboard: http://127.0.0.1" in out and "token authentication" in out

    # `run OUTPUT/grid.yaml`: the saved copy resumes the sweep
    with _driver(
        tmp_path, "run", str(output / "grid.yaml"), "--no-progress", "--no-dashboard"
    ) as again:
        assert again.wait(timeout=400) == 0, again.err.read_text()[-3000:]
    out = again.out.read_text()
    assert f"3 trials, {len(recorded)} already recorded, {3 - len(recorded)} to run" in out
    _one_valid_record_per_trial(output / "grid.yaml")
    assert {p.name: p.stat().st_mtime_ns for p in _records(output) if p.name in recorded} == (
        recorded
    )
    assert (output / "report.html").stat().st_size > 0


def test_sigterm_stops_the_sweep_without_an_abort(
    tiny_grid: dict[str, Any], write_grid: Callable[[dict[str, Any]], Path], tmp_path: Path
) -> None:
    grid = _grid(tiny_grid)
    path, output = write_grid(grid), Path(grid["output"])
    with _driver(tmp_path, "run", str(path), "--no-progress", RAY_AUTH_MODE="disabled") as proc:
        seconds = _interrupt(proc, signal.SIGTERM, output)
        gone = _wait_for(lambda: not _processes_of(proc.marker), 30, "the run's processes to end")
    out, err = proc.out.read_text(), proc.err.read_text()
    print(f"SIGTERM to exit: {seconds:.1f} s")  # noqa: T201
    assert proc.returncode == 143, err[-3000:]
    assert "Ray dashboard: http" in out and "token" not in out  # token auth is off
    assert "SIGTERM received" not in err and "*** " not in err  # Ray's C++ abort handler
    assert "interrupted (SIGTERM)" in err and "run the same command again to resume" in err
    assert gone
    recorded = _records(output)
    assert 1 <= len(recorded) < 3  # valid records; a re-run after a stop: the SIGINT test
    assert RecordStore(output).existing_ids() == {p.stem for p in recorded}
    assert not (output / "report.html").exists()


def test_sigterm_stops_a_search_and_the_same_command_resumes_it(
    tiny_grid: dict[str, Any], write_grid: Callable[[dict[str, Any]], Path], tmp_path: Path
) -> None:
    grid = _grid(tiny_grid, seeds=1)
    grid["search"] = {
        "space": {"train": {"lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}},
        "constraints": {"train_time_s": 600},
        "trials": 3,
        "n_parallel": 1,
    }
    path, output = write_grid(grid), Path(grid["output"])
    command = ("search", str(path), "--no-dashboard")
    with _driver(tmp_path, *command) as proc:
        seconds = _interrupt(proc, signal.SIGTERM, output)
        gone = _wait_for(lambda: not _processes_of(proc.marker), 30, "the run's processes to end")
    out, err = proc.out.read_text(), proc.err.read_text()
    print(f"SIGTERM to exit (search): {seconds:.1f} s")  # noqa: T201
    assert proc.returncode == 143, err[-3000:]
    assert "interrupted (SIGTERM)" in err and "run the same command again to resume" in err
    assert "*** " not in err and "Traceback" not in err and gone
    assert "stopped: ran " in out and not (output / "search.json").exists()
    told = out.count("] #")  # one line per trial told
    assert 1 <= told < 3

    with _driver(tmp_path, *command) as again:
        assert again.wait(timeout=400) == 0, again.err.read_text()[-3000:]
    out = again.out.read_text()
    assert f"resuming study tiny: {told} of 3 trials done" in out and "[3/3]" in out
    store = RecordStore(output)
    assert store.existing_ids() == {p.stem for p in _records(output)} and not store.quarantined
    assert (output / "search.json").exists()


# ---------------------------------------------------------------- one driver per output


def test_a_second_driver_is_refused_and_a_dead_ones_lock_does_not_block(
    tiny_grid: dict[str, Any], write_grid: Callable[[dict[str, Any]], Path], tmp_path: Path
) -> None:
    grid = _grid(tiny_grid, seeds=2)
    path, output = write_grid(grid), Path(grid["output"])
    lock = output / LOCK_FILE
    with _driver(tmp_path, "run", str(path), "--no-progress", "--no-dashboard") as first:

        def owner() -> dict[str, Any] | None:
            with contextlib.suppress(OSError, ValueError):
                return json.loads(lock.read_text())
            return None

        held = _wait_for(owner, 60, "the first driver's lock")
        assert (held["host"], held["pid"]) == (socket.gethostname(), first.pid)
        second = subprocess.run(
            [ORCHESTRATE, "run", str(path), "--no-progress"], capture_output=True, text=True
        )
        assert second.returncode == 2, second.stderr
        assert f"host {socket.gethostname()}, pid {first.pid}, since {held['started_at']}" in (
            second.stderr
        )
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGKILL)  # the owner dies holding the lock
        first.wait()
    assert json.loads(lock.read_text())["pid"] == first.pid  # its lock file stays behind

    # every trial recorded meanwhile (no Ray needed): the next driver owns the folder
    store = RecordStore(output)
    for spec in expand(load_grid(path)):
        store.write(TrialRecord(spec=spec, status="ok", accuracy=0.5, peak_mem_mb=1.0))
    assert main(["run", str(path), "--no-progress"]) == 0
    assert lock.read_text() == ""  # released
    _one_valid_record_per_trial(path)


def test_a_saved_grid_copy_is_a_grid_to_resume_from(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_grid(tiny_grid)
    output = Path(tiny_grid["output"])
    store = RecordStore(output)
    for spec in expand(load_grid(path)):
        store.write(TrialRecord(spec=spec, status="ok", accuracy=0.5, peak_mem_mb=1.0))
    assert main(["run", str(path), "--no-progress"]) == 0
    saved = output / "grid.yaml"
    assert saved.read_text() == path.read_text()
    assert main(["run", str(saved), "--no-progress"]) == 0  # once a SameFileError
    assert "2 trials, 2 already recorded, 0 to run" in capsys.readouterr().out


# ---------------------------------------------------------------- write errors


def test_an_output_that_cannot_be_written_mid_sweep_is_one_line_and_records_stay(
    tiny_grid: dict[str, Any], write_grid: Callable[[dict[str, Any]], Path], tmp_path: Path
) -> None:
    """A folder where a record file belongs: a write no user, root included, can make."""
    grid = _grid(tiny_grid)
    path, output = write_grid(grid), Path(grid["output"])
    ids = {s.trial_id for s in expand(load_grid(path))}
    with _driver(tmp_path, "run", str(path), "--no-progress", "--no-dashboard") as proc:
        _wait_for(lambda: _records(output) or proc.poll() is not None, what="a first record")
        blocked = [output / "records" / f"{i}.parquet" for i in ids]
        for target in blocked:
            with contextlib.suppress(FileExistsError):
                target.mkdir()  # only where no record was written yet
        proc.wait(timeout=240)
    err = proc.err.read_text()
    assert proc.returncode == 1, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("orchestrate:")]
    assert len(ours) == 1 and "Traceback" not in err, err[-3000:]
    assert ours[0].startswith(f"orchestrate: failed: cannot write {output.resolve()}/records/")
    assert ours[0].endswith(".parquet: Is a directory")
    written = [p for p in blocked if p.is_file()]
    assert 1 <= len(written) < 3
    assert RecordStore(output).existing_ids() == {p.stem for p in written}

    for target in blocked:  # the fault repaired: one run completes the sweep
        if target.is_dir():
            target.rmdir()
    assert main(["run", str(path), "--no-progress", "--no-dashboard"]) == 0
    _one_valid_record_per_trial(path)
