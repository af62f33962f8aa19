"""Group commit of records off the driver's event loop: grouping, errors, kills."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from orchestrator.group_commit import GroupCommit
from orchestrator.records import RecordStore, TrialRecord, WriteError
from orchestrator.spec import TrialSpec


def _record(seed: int) -> TrialRecord:
    spec = TrialSpec(backbone="vit_test", method="lora", dataset="digits", seed=seed)
    return TrialRecord(spec=spec, status="ok", accuracy=seed / 100)


class _GatedStore(RecordStore):
    """A store whose first write waits until the test opens the gate."""

    def __init__(self, output: Path) -> None:
        super().__init__(output)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def write_many(self, records: Sequence[TrialRecord]) -> str | None:
        self.entered.set()
        assert self.gate.wait(30)
        return super().write_many(records)


def test_records_put_during_a_write_are_the_next_group(tmp_path: Path) -> None:
    store = _GatedStore(tmp_path / "out")
    with GroupCommit(store) as commit:
        commit.put(_record(0))
        assert store.entered.wait(30)  # the first group (one record) is being written
        for seed in range(1, 6):
            commit.put(_record(seed))  # returns at once: the writer is busy
        assert RecordStore(tmp_path / "out").existing_ids() == set()
        store.gate.set()
        commit.flush()
        assert commit.groups == [1, 5]
    fresh = RecordStore(tmp_path / "out")
    assert fresh.existing_ids() == {_record(s).trial_id for s in range(6)}
    assert len(fresh.listing()) == 2  # one file per group
    accuracy = fresh.collect().set_index("trial_id")["accuracy"]
    assert accuracy[_record(3).trial_id] == pytest.approx(0.03)


def test_a_write_error_stops_writing_and_is_raised(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "out")
    commit = GroupCommit(store)
    commit.put(_record(0))
    commit.flush()
    Path(store.records_dir).rename(tmp_path / "moved")
    Path(store.records_dir).write_text("a file where the records folder was")
    commit.put(_record(1))
    with pytest.raises(WriteError, match="cannot write"):
        commit.flush()
    with pytest.raises(WriteError):
        commit.put(_record(2))
    commit.close()
    assert isinstance(commit.error, WriteError)
    assert {p.name for p in (tmp_path / "moved").iterdir()} == {f"{_record(0).trial_id}.parquet"}


def test_a_failure_that_is_no_os_error_reaches_the_driver(tmp_path: Path) -> None:
    class Broken(RecordStore):
        def write_many(self, records: Sequence[TrialRecord]) -> str | None:
            raise ValueError("unexpected")

    commit = GroupCommit(Broken(tmp_path / "out"))
    commit.put(_record(0))
    with pytest.raises(WriteError, match="unexpected"):
        commit.flush()  # and does not hang
    commit.close()


KILLED_DRIVER = """
import os, signal
from orchestrator.group_commit import GroupCommit
from orchestrator.records import RecordStore, TrialRecord
from orchestrator.spec import TrialSpec

def _record(seed):
    spec = TrialSpec(backbone="vit_test", method="lora", dataset="digits", seed=seed)
    return TrialRecord(spec=spec, status="ok", accuracy=seed / 100)

commit = GroupCommit(RecordStore({out!r}))
for seed in range(40):
    commit.put(_record(seed))
    if seed % 10 == 9:
        commit.flush()
        print("durable", seed, flush=True)
for seed in range(40, 80):
    commit.put(_record(seed))
os.kill(os.getpid(), signal.SIGKILL)  # a driver killed with records in flight
"""


def test_a_killed_driver_keeps_every_flushed_record_and_no_half_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = textwrap.dedent(KILLED_DRIVER).format(out=str(out))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    acknowledged = [int(line.split()[1]) for line in proc.stdout.splitlines()]
    assert acknowledged == [9, 19, 29, 39]
    store = RecordStore(out)
    found = store.existing_ids()
    assert {_record(s).trial_id for s in range(40)} <= found  # every flushed one
    assert found <= {_record(s).trial_id for s in range(80)}
    frame = store.collect()
    assert store.quarantined == [] and frame["trial_id"].is_unique
    assert len(frame) == len(found)


def test_the_sweeps_recorder_pickles_light_while_its_commit_writes(tmp_path: Path) -> None:
    """Tune pickles its callbacks with its experiment state, from its own thread, while
    records are being committed: neither the store (its cached tables change meanwhile),
    the commit's thread nor the caller's stop request go into that state."""
    from ray import cloudpickle

    from orchestrator.tune_driver import _Recorder

    store = _GatedStore(tmp_path / "out")
    lock = threading.Lock()  # e.g. in a signal handler that the stop request reaches
    recorder = _Recorder(store, 3, show_progress=False, should_stop=lambda: lock.locked())
    recorder.commit.put(_record(0))
    assert store.entered.wait(30)  # a group is being written
    state = cloudpickle.loads(cloudpickle.dumps(recorder)).__dict__
    assert not {"store", "commit", "bar", "should_stop"} & set(state)
    assert state["written"] == set() and state["done"] == 0
    store.gate.set()
    recorder.close()
    assert RecordStore(tmp_path / "out").existing_ids() == {_record(0).trial_id}


def test_records_that_come_often_linger_together_and_one_alone_does_not(
    tmp_path: Path,
) -> None:
    now = [0.0]
    commit = GroupCommit(RecordStore(tmp_path / "out"), linger_s=3600, clock=lambda: now[0])
    commit.put(_record(0))  # alone: written at once, no flush needed
    _wait_for_groups(commit, [1])
    for seed in (1, 2, 3):  # each within the linger of the one before
        commit.put(_record(seed))
    done = threading.Thread(target=commit.flush)  # a flush does not wait out the linger
    done.start()
    done.join(60)
    assert not done.is_alive()
    assert commit.groups == [1, 3]
    now[0] = 10_000.0  # long after the last one: alone again, written at once
    commit.put(_record(4))
    _wait_for_groups(commit, [1, 3, 1])
    now[0] += 1.0
    commit.put(_record(5), more_coming=False)  # soon after, but the last trial's: at once
    _wait_for_groups(commit, [1, 3, 1, 1])
    now[0] += 1.0
    commit.put(_record(6))  # soon after, more coming: it lingers, until the close writes it
    commit.close()
    assert commit.groups == [1, 3, 1, 1, 1]
    assert len(RecordStore(tmp_path / "out").existing_ids()) == 7


def _wait_for_groups(commit: GroupCommit, groups: list[int]) -> None:
    """Until the commit has written ``groups`` (a lingering group would take an hour)."""
    deadline = time.monotonic() + 60
    while commit.groups != groups and time.monotonic() < deadline:
        time.sleep(0.01)
    assert commit.groups == groups
