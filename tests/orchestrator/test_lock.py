"""The output folder's lock: one live driver at a time; a dead one never blocks for long."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator import lock
from orchestrator.lock import LOCK_FILE, OutputBusy, OutputLock
from orchestrator.records import WriteError


def _dead_pid() -> int:
    """The pid of a process of this host that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_owner(folder: Path, host: str, pid: int, heartbeat: float) -> None:
    owner = {"host": host, "pid": pid, "started_at": "2026-01-01T00:00:00Z", "heartbeat": heartbeat}
    (folder / LOCK_FILE).write_text(json.dumps(owner))


def test_a_second_process_is_refused_naming_the_owner(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time
                from orchestrator.lock import OutputLock
                with OutputLock({str(tmp_path)!r}):
                    print("locked", flush=True)
                    time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputBusy) as busy:
            OutputLock(tmp_path).acquire()
        message = str(busy.value)
        assert f"pid {holder.pid}" in message and f"host {socket.gethostname()}" in message
        assert "since 20" in message and str(tmp_path / LOCK_FILE) in message
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the dead holder's flock: the folder is free at once
    with OutputLock(tmp_path):
        owner = json.loads((tmp_path / LOCK_FILE).read_text())
        assert (owner["host"], owner["pid"]) == (socket.gethostname(), os.getpid())
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: an empty file is a free lock


def test_a_dead_owner_on_this_host_is_taken_over(tmp_path: Path) -> None:
    _write_owner(tmp_path, socket.gethostname(), _dead_pid(), time.time())
    with OutputLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize(("age_s", "busy"), [(10.0, True), (lock.STALE_S + 60, False)])
def test_an_owner_on_another_host_counts_while_its_heartbeat_is_fresh(
    tmp_path: Path, age_s: float, busy: bool
) -> None:
    """A shared file system whose flock does not reach the other host: only the file tells."""
    _write_owner(tmp_path, "other-host.example", 4242, time.time() - age_s)
    if busy:
        with pytest.raises(OutputBusy, match="host other-host.example, pid 4242"):
            OutputLock(tmp_path).acquire()
    else:
        with OutputLock(tmp_path):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == socket.gethostname()


@pytest.mark.parametrize("owner_alive", [True, False])
def test_without_flock_a_local_owner_counts_while_its_pid_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, owner_alive: bool
) -> None:
    monkeypatch.setattr(lock, "_try_flock", lambda fd: None)  # a file system without flock
    pid = os.getppid() if owner_alive else _dead_pid()
    _write_owner(tmp_path, socket.gethostname(), pid, time.time())
    if owner_alive:
        with pytest.raises(OutputBusy, match=f"pid {pid}"):
            OutputLock(tmp_path).acquire()
    else:
        with OutputLock(tmp_path):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_the_owner_refreshes_its_heartbeat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    with OutputLock(tmp_path):
        first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.1)
            text = (tmp_path / LOCK_FILE).read_text()
            if text and json.loads(text)["heartbeat"] > first:
                break
        else:
            pytest.fail("the heartbeat was not refreshed")


def test_a_lock_that_cannot_be_written_is_a_write_error(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).mkdir()  # a folder where the file belongs: unwritable even for root
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / LOCK_FILE}: Is a directory"):
        OutputLock(tmp_path).acquire()
