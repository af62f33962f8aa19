"""Records at scale: group commits, compaction into parts, and nothing lost or duplicated
when a compaction is killed at a random instant or read while it runs."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from orchestrator import compaction
from orchestrator.records import RecordStore, TrialRecord
from orchestrator.spec import TrialSpec


def _record(seed: int, status: str = "ok") -> TrialRecord:
    spec = TrialSpec(backbone="vit_test", method="lora", method_args={"r": 4}, seed=seed)
    accuracy = (seed % 100) / 100 if status == "ok" else None
    return TrialRecord(spec=spec, status=status, accuracy=accuracy, peak_mem_mb=float(seed))


def _files(store: RecordStore) -> list[str]:
    return sorted(p.name for p in Path(store.records_dir).glob("*.parquet"))


def _raw_ids(store: RecordStore) -> list[str]:
    """trial_id of every row, as a tool reading records/ as a dataset sees them."""
    return pads.dataset(store.records_dir).to_table(columns=["trial_id"])["trial_id"].to_pylist()


def test_group_commit_writes_one_part_that_every_reader_sees(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    records = [_record(s) for s in range(10)]
    path = store.write_many(records)
    assert _files(store) == [Path(path).name] and compaction.is_part(Path(path).name)
    ids = {r.trial_id for r in records}
    assert store.existing_ids() == ids
    assert set(pd.read_parquet(store.records_dir)["trial_id"]) == ids
    assert sorted(_raw_ids(store)) == sorted(ids)
    assert store.read_record(records[3].trial_id).peak_mem_mb == 3.0
    frame = RecordStore(tmp_path).collect().set_index("trial_id")
    assert frame["peak_mem_mb"].to_dict() == {r.trial_id: float(r.spec.seed) for r in records}


def test_compaction_keeps_a_few_files_and_every_record(tmp_path: Path) -> None:
    store = RecordStore(tmp_path, compact_every=4)
    records = [_record(s) for s in range(70)]
    for r in records[:40]:
        store.write(r)
    for i in range(40, 70, 3):
        store.write_many(records[i : i + 3])
    assert len(_files(store)) < 20  # 50 commits
    assert sorted(_raw_ids(store)) == sorted(r.trial_id for r in records)
    frame = RecordStore(tmp_path).collect()
    assert frame["trial_id"].tolist() == sorted(r.trial_id for r in records)
    by_id = frame.set_index("trial_id")["peak_mem_mb"]
    assert all(by_id[r.trial_id] == r.spec.seed for r in records)
    assert store.compact(everything=True) == 1 and len(_files(store)) == 1
    assert sorted(_raw_ids(store)) == sorted(r.trial_id for r in records)


def test_a_trial_recorded_again_is_its_newest_record(tmp_path: Path) -> None:
    """--retry-failed runs a failed trial again after its record went into a part."""
    store = RecordStore(tmp_path)
    first = [_record(s, status="failed") for s in range(3)]
    store.write_many(first)
    store.write(_record(1, status="ok"))  # the rerun, as its own file
    store.write_many([_record(2, status="oom"), _record(5)])  # and in a later part
    frame = RecordStore(tmp_path).collect().set_index("trial_id")
    assert len(frame) == 4
    assert frame.loc[first[0].trial_id, "status"] == "failed"
    assert frame.loc[first[1].trial_id, "status"] == "ok"
    assert frame.loc[first[2].trial_id, "status"] == "oom"
    assert store.read_record(first[1].trial_id).status == "ok"
    assert len(_raw_ids(store)) == 6  # the superseded rows stay until a compaction...
    store.compact(everything=True)
    assert sorted(_raw_ids(store)) == sorted(frame.index)  # ...which drops them
    again = RecordStore(tmp_path).collect().set_index("trial_id")
    assert again["status"].to_dict() == frame["status"].to_dict()


def _interrupted_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: str) -> RecordStore:
    """A merge of 8 single files that dies ``after`` "intent" or "parts"."""
    store = RecordStore(tmp_path, compact_every=0)
    for s in range(8):
        store.write(_record(s))

    class Killed(BaseException):
        pass

    def die(*args: object, **kwargs: object) -> None:
        raise Killed

    target = "write_table_at" if after == "intent" else "sync_records_dir"
    monkeypatch.setattr(store, target, die)
    if after == "parts":
        monkeypatch.setattr(store, "delete", die)
    with pytest.raises(Killed):
        store.compact(everything=True)
    monkeypatch.undo()
    assert len(list((tmp_path / compaction.INTENTS).glob("*.json"))) == 1
    return store


@pytest.mark.parametrize("after", ["intent", "parts"])
def test_an_interrupted_merge_is_rolled_back_or_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: str
) -> None:
    store = _interrupted_merge(tmp_path, monkeypatch, after)
    ids = {_record(s).trial_id for s in range(8)}
    if after == "parts":  # the part and its inputs both there: readers still see each once
        assert len(_raw_ids(store)) == 16
    assert set(RecordStore(tmp_path).collect()["trial_id"]) == ids
    assert RecordStore(tmp_path).existing_ids() == ids  # recovers
    assert list((tmp_path / compaction.INTENTS).glob("*.json")) == []
    assert sorted(_raw_ids(store)) == sorted(ids)
    kinds = {compaction.is_part(n) for n in _files(store)}
    assert kinds == ({True} if after == "parts" else {False})


def test_a_merge_in_flight_in_another_process_is_left_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers of one output: while one compacts (its flock held), the other neither
    compacts nor takes the first one's intent for an interrupted merge."""
    store = _interrupted_merge(tmp_path, monkeypatch, "intent")
    files = _files(store)
    held = os.open(tmp_path / compaction.INTENTS / ".lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        other = RecordStore(tmp_path, compact_every=0)
        assert other.existing_ids() == {_record(s).trial_id for s in range(8)}
        assert other.compact(everything=True) == 0
        assert len(list((tmp_path / compaction.INTENTS).glob("*.json"))) == 1
        assert _files(store) == files
    finally:
        os.close(held)
    RecordStore(tmp_path).existing_ids()  # the lock is free: rolled back now
    assert list((tmp_path / compaction.INTENTS).glob("*.json")) == []


def test_a_record_written_again_during_a_merge_is_not_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _interrupted_merge(tmp_path, monkeypatch, "parts")
    time.sleep(0.01)  # a later modification time
    newer = _record(3, status="failed")
    newer.error = "written after the merge read the file"
    store.write(newer)
    RecordStore(tmp_path).existing_ids()  # finishes the merge: the newer file stays
    assert Path(store.path_of(newer.trial_id)).exists()
    frame = RecordStore(tmp_path).collect().set_index("trial_id")
    assert frame.loc[newer.trial_id, "error"] == newer.error and len(frame) == 8


def test_a_damaged_part_is_quarantined_whole(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    store.write(_record(0))
    part = Path(store.write_many([_record(1), _record(2)]))
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    fresh = RecordStore(tmp_path)
    assert fresh.existing_ids() == {_record(0).trial_id}
    assert [q[0] for q in fresh.quarantined] == [part.name]


def test_a_part_with_a_forged_row_is_quarantined(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    part = Path(store.write_many([_record(1), _record(2)]))
    table = pq.read_table(part)
    ids = table["trial_id"].to_pylist()
    forged = table.set_column(0, "trial_id", [[ids[0], "0123456789ab"]])
    pq.write_table(forged, part)
    fresh = RecordStore(tmp_path)
    assert fresh.collect().empty
    assert "does not hash to its trial_id" in fresh.quarantined[0][2]


def test_uri_output_compacts_through_pyarrow_filesystems(tmp_path: Path) -> None:
    store = RecordStore(f"file://{tmp_path}/sweep", compact_every=4)
    records = [_record(s) for s in range(12)]
    for r in records:
        store.write(r)
    assert len(list((tmp_path / "sweep" / "records").glob("*.parquet"))) < 12
    assert RecordStore(f"file://{tmp_path}/sweep").existing_ids() == {r.trial_id for r in records}
    assert store.read_record(records[5].trial_id).peak_mem_mb == 5.0


# ---------------------------------------------------------------- kills and readers

WRITER = textwrap.dedent(
    """
    import sys, time
    from orchestrator import compaction
    from orchestrator.records import RecordStore, TrialRecord
    from orchestrator.spec import TrialSpec

    out, seed, stop_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = RecordStore(out, compact_every=4)
    merge, steps, merging = compaction._merge, [0], [False]

    def marked(*args, **kwargs):  # a merge's file operations are counted from here
        merging[0] = True
        try:
            return merge(*args, **kwargs)
        finally:
            merging[0] = False

    def counted(operation):  # before the stop_at-th file operation of the merges: wait
        def call(*args, **kwargs):
            if merging[0]:
                steps[0] += 1
                if steps[0] == stop_at:
                    print("stopped", flush=True)
                    time.sleep(600)
            return operation(*args, **kwargs)
        return call

    compaction._merge = marked
    for name in ("write_bytes_at", "write_table_at", "delete", "sync_records_dir"):
        setattr(store, name, counted(getattr(store, name)))

    def record(seed):
        spec = TrialSpec(backbone="vit_test", method="lora", method_args={"r": 4}, seed=seed)
        return TrialRecord(spec=spec, status="ok", accuracy=0.5, peak_mem_mb=float(seed))

    print("ready", flush=True)
    while True:
        group = [record(seed + k) for k in range(3)]
        print("writing", *[seed + k for k in range(4)], flush=True)
        store.write_many(group)
        print("acked", *[seed + k for k in range(3)], flush=True)
        store.write(record(seed + 3))
        print("acked", seed + 3, flush=True)
        seed += 4
    """
)


def _id(seed: int) -> str:
    return _record(seed).trial_id


def _take(line: str, acked: set[str], attempted: set[str]) -> None:
    """Note a line of the writer's."""
    kind, *values = line.split()
    if kind in ("acked", "writing"):
        (acked if kind == "acked" else attempted).update(_id(int(s)) for s in values)


def test_compactions_killed_at_random_instants_lose_and_duplicate_nothing(
    tmp_path: Path,
) -> None:
    """A writer that commits groups and single records and compacts every 4 files is
    SIGKILLed after a random number of acknowledged records: at a random instant, or
    (every other time) inside a merge, at a random one of its file operations after the
    intent (the writer waits there to be killed). Meanwhile this process collects. Every
    acknowledged record is there, each once; nothing else appears; nothing is
    quarantined; a reader during the merges sees every record acknowledged before it
    started, each once."""
    rng = random.Random(20261206)
    out = tmp_path / "out"
    acked: set[str] = set()
    attempted: set[str] = set()
    inside = 0
    for iteration in range(6):
        # the writer starts past every seed used; stop_at 0: never stops by itself
        stop_at = rng.randint(2, 12) if iteration % 2 else 0
        command = [sys.executable, "-c", WRITER, str(out), str(len(attempted)), str(stop_at)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        target = len(acked) + rng.randint(4, 16)
        line = ""
        while len(acked) < target and line != "stopped":  # a reader beside the writer
            line = proc.stdout.readline().strip()
            _take(line, acked, attempted)
            if line.startswith("acked"):
                before = set(acked)
                frame = RecordStore(out, compact_every=0).collect()
                assert frame["trial_id"].is_unique and before <= set(frame["trial_id"])
        if stop_at:
            while line != "stopped":
                line = proc.stdout.readline().strip()
                _take(line, acked, attempted)
        else:
            time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        for line in proc.stdout.read().splitlines():  # what readline() holds, and the rest
            _take(line, acked, attempted)
        intents = out / compaction.INTENTS
        inside += intents.is_dir() and any(intents.glob("*.json"))
        store = RecordStore(out, compact_every=0)
        found = store.existing_ids()  # finishes or rolls back a merge the kill cut short
        assert acked - found == set(), "acknowledged records lost"
        assert found - attempted == set(), "records nobody wrote"
        assert sorted(_raw_ids(store)) == sorted(found)  # each once, even for other tools
        assert store.quarantined == [] and not (out / "quarantine").exists()
        left = [p.name for p in intents.iterdir() if p.name != ".lock"]
        assert left == []  # temporaries of a killed intent write too
        frame = store.collect()
        assert frame["trial_id"].tolist() == sorted(found)
        assert frame["peak_mem_mb"].notna().all()
    assert inside >= 3  # every kill inside a merge found its intent, and recovered it
    print(json.dumps({"acked": len(acked), "kills_after_an_intent": inside}))


@pytest.mark.parametrize("retry_failed", [False, True])
def test_run_counts_trials_recorded_in_parts(
    tiny_grid: dict,
    write_grid: Callable[[dict], Path],
    capsys: pytest.CaptureFixture[str],
    retry_failed: bool,
) -> None:
    """A dry run (read only) finds the records inside parts; with --retry-failed a trial
    whose newest record is failed runs again, one whose newest is ok does not."""
    from orchestrator.cli import main
    from orchestrator.expansion import expand
    from orchestrator.grid import load_grid

    path = write_grid(tiny_grid)
    specs = expand(load_grid(path))
    store = RecordStore(tiny_grid["output"])
    store.write_many([TrialRecord(spec=s, status="failed", error="x") for s in specs])
    store.write(TrialRecord(spec=specs[0], status="ok", accuracy=0.5, peak_mem_mb=1.0))
    store.compact(everything=True)
    flag = ["--retry-failed"] if retry_failed else []
    todo = len(specs) - 1 if retry_failed else 0
    done = len(specs) - todo
    assert main(["run", str(path), "--dry-run", *flag]) == 0
    line = f"{len(specs)} trials, {done} already recorded, {todo} to run"
    assert line in capsys.readouterr().out
    assert not Path(tiny_grid["output"], "quarantine").exists()  # read only
    assert RecordStore(tiny_grid["output"]).existing_ids() == {s.trial_id for s in specs}
