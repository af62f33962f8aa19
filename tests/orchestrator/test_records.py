"""Record store: schema, atomic writes, listing, collection."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import records as records_mod
from orchestrator.records import RecordStore, TrialRecord, record_schema, schema_fields
from orchestrator.spec import TrainConfig, TrialSpec

REQUIRED_COLUMNS = (
    "trial_id kind status error backbone method checkpointing dataset seed budget_mb accuracy "
    "peak_mem_mb mem_source energy_j energy_source train_time_s params_total params_trainable macs"
).split()


def _record(seed: int = 0, status: str = "ok", accuracy: float | None = 0.5) -> TrialRecord:
    spec = TrialSpec(
        backbone="vit_test",
        method="lora",
        method_args={"r": 4, "alpha": 8.0},
        dataset="digits",
        seed=seed,
        train=TrainConfig(epochs=2),
    )
    return TrialRecord(
        spec=spec,
        status=status,
        accuracy=accuracy,
        peak_mem_mb=12.5,
        mem_source="accounted",
        params_total=1000,
        params_trainable=10,
        macs=12345,
        energy_source="unavailable",
    )


def test_schema_has_the_documented_columns_once() -> None:
    names = [n for n, _, _ in schema_fields()]
    assert len(names) == len(set(names))
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    assert missing == []
    assert (
        record_schema().metadata[b"vramsweep_schema_version"]
        == str(records_mod.SCHEMA_VERSION).encode()
    )


def test_docs_document_every_column() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "records.md").read_text()
    undocumented = [n for n, _, _ in schema_fields() if f"`{n}`" not in doc]
    assert undocumented == []


def test_record_round_trips_through_parquet(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    rec = _record()
    path = store.write(rec)
    assert Path(path).name == f"{rec.trial_id}.parquet"
    back = store.read_record(rec.trial_id)
    assert back.spec == rec.spec
    assert back.accuracy == 0.5 and back.macs == 12345 and back.status == "ok"
    table = pq.read_table(path)
    schema = record_schema()  # then the trial's argument columns
    assert pa.schema(list(table.schema)[: len(schema)]).equals(schema, check_metadata=False)
    assert table.column_names[len(schema) :] == ["method.alpha", "method.r"]
    row = table.to_pylist()[0]
    assert row["method_args"] == '{"alpha":8.0,"r":4}'
    assert row["train_epochs"] == 2


def test_unknown_status_is_rejected() -> None:
    with pytest.raises(ValueError, match="status must be one of"):
        _record(status="done")


def test_collect_reads_every_record_sorted(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    recs = [_record(seed=s, accuracy=s / 10) for s in range(4)]
    for rec in recs:
        store.write(rec)
    frame = store.collect()
    assert list(frame["trial_id"]) == sorted(r.trial_id for r in recs)
    assert sorted(frame["accuracy"]) == [0.0, 0.1, 0.2, 0.3]
    assert store.existing_ids() == {r.trial_id for r in recs}


def test_version_1_records_collect_beside_version_2(tmp_path: Path) -> None:
    """A sweep resumed after the schema grew: old files lack the new columns."""
    store = RecordStore(tmp_path)
    old, new = _record(seed=0), _record(seed=1)
    store.write(new)
    v2_only = [
        "ckpt_plan",
        "ckpt_predicted_peak_mb",
        "ckpt_recompute_ms",
        "ckpt_replans",
        "cuda_max_requested_mb",
        "nvml_process_mb",
        "mem_meters",
    ]
    store.write(old)
    path = store.path_of(old.trial_id)
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(v2_only), path)
    frame = store.collect().set_index("trial_id")
    assert set(v2_only) <= set(frame.columns)
    assert pd.isna(frame.loc[old.trial_id, "ckpt_plan"])
    assert frame.loc[new.trial_id, "ckpt_plan"] == new.ckpt_plan
    assert frame.loc[old.trial_id, "accuracy"] == old.accuracy


def test_version_4_records_collect_beside_version_5(tmp_path: Path) -> None:
    """Records written before data_skipped_images existed still collect and read back."""
    store = RecordStore(tmp_path)
    old, new = _record(seed=0), _record(seed=1)
    new.data_skipped_images = 2
    store.write(new)
    store.write(old)
    path = store.path_of(old.trial_id)
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["data_skipped_images"]), path)
    frame = store.collect().set_index("trial_id")
    assert pd.isna(frame.loc[old.trial_id, "data_skipped_images"])
    assert frame.loc[new.trial_id, "data_skipped_images"] == 2
    assert store.read_record(old.trial_id).data_skipped_images is None


def test_version_5_records_collect_beside_version_6(tmp_path: Path) -> None:
    """Records written before the block-profile columns existed still collect."""
    store = RecordStore(tmp_path)
    old, new = _record(seed=0), _record(seed=1)
    new.ckpt_profile_s, new.ckpt_profile_cached = 0.0, True
    store.write(new)
    store.write(old)
    path = store.path_of(old.trial_id)
    pq.write_table(
        pq.read_table(path).drop_columns(["ckpt_profile_s", "ckpt_profile_cached"]), path
    )
    frame = store.collect().set_index("trial_id")
    assert pd.isna(frame.loc[old.trial_id, "ckpt_profile_cached"])
    assert frame.loc[new.trial_id, "ckpt_profile_cached"]
    assert store.read_record(old.trial_id).ckpt_profile_s is None


def test_rewrite_replaces_the_record(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    store.write(_record(status="failed", accuracy=None))
    store.write(_record(status="ok", accuracy=0.9))
    frame = store.collect()
    assert len(frame) == 1 and frame["status"][0] == "ok" and frame["accuracy"][0] == 0.9


class _DiskVanished(RuntimeError):
    pass


def test_write_failing_midway_leaves_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half the bytes are written when the write dies: nothing readable may appear."""
    store = RecordStore(tmp_path)
    original_open = open

    def failing_open(path, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202
        handle = original_open(path, mode, *args, **kwargs)
        if "w" in mode and str(path).endswith(".tmp"):
            real_write = handle.write

            def write(data: bytes) -> int:
                real_write(data[: len(data) // 2])
                raise _DiskVanished("disk vanished")

            handle.write = write
        return handle

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(_DiskVanished):
        store.write(_record())
    monkeypatch.undo()
    assert store.existing_ids() == set()
    assert list(Path(store.records_dir).iterdir()) == []  # the temporary file is cleaned up
    assert store.collect().empty


def test_killed_writer_leaves_only_an_ignored_temp_file(tmp_path: Path) -> None:
    """SIGKILL in the middle of a write (no cleanup runs): the record does not exist."""
    script = textwrap.dedent(
        f"""
        import os, time
        from orchestrator.records import RecordStore
        store = RecordStore({str(tmp_path)!r})
        target = store.records_dir + "/abcdef012345.parquet"
        tmp = store.records_dir + "/.abcdef012345.parquet.999.deadbeef.tmp"
        with open(tmp, "wb") as fh:
            fh.write(b"PAR1" + b"x" * 1000)
            fh.flush()
            print("writing", flush=True)
            time.sleep(60)
        os.replace(tmp, target)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    store = RecordStore(tmp_path)
    assert [p.name for p in Path(store.records_dir).iterdir()] == [
        ".abcdef012345.parquet.999.deadbeef.tmp"
    ]
    assert store.existing_ids() == set()
    assert store.collect().empty
    store.write(_record())  # the store stays usable
    assert len(store.collect()) == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "other_trial"])
def test_unreadable_record_is_named_quarantined_and_run_again(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.cli import main

    store = RecordStore(tmp_path)
    good, bad = _record(seed=0), _record(seed=1)
    store.write(good)
    path = Path(store.write(bad))
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"PAR1" + bytes(200) + b"PAR1")
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a readable record under another trial's name
        path.write_bytes(Path(store.path_of(good.trial_id)).read_bytes())
    fresh = RecordStore(tmp_path)
    if damage != "other_trial":  # its footer is fine: only a full read can tell
        assert fresh.existing_ids() == {good.trial_id}
    frame = fresh.collect()
    assert frame["trial_id"].tolist() == [good.trial_id]
    assert [q[0] for q in fresh.quarantined] == [path.name]
    moved = list((tmp_path / "quarantine").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith(path.name)
    assert not path.exists()
    # nothing is left for the next reader to trip over, and the CLI names what it moved
    assert RecordStore(tmp_path).existing_ids() == {good.trial_id}
    path.write_bytes(b"junk")
    assert main(["collect", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"unreadable record {path.name}" in err and "1 record(s) quarantined" in err


def test_uri_output_goes_through_pyarrow_filesystems(tmp_path: Path) -> None:
    """s3:// and gs:// outputs use the same pyarrow-filesystem path as file:// here."""
    store = RecordStore(f"file://{tmp_path}/sweep")
    assert store.is_uri
    a, b = _record(seed=0), _record(seed=1)
    store.write(a)
    store.write(b)
    assert store.existing_ids() == {a.trial_id, b.trial_id}
    assert store.read_record(a.trial_id).spec == a.spec
    Path(store.path_of(b.trial_id)).write_bytes(b"PAR1 torn")  # the same files, locally
    assert store.collect()["trial_id"].tolist() == [a.trial_id]
    assert [q[0] for q in store.quarantined] == [f"{b.trial_id}.parquet"]
    assert len(list((tmp_path / "sweep" / "quarantine").iterdir())) == 1
    store.write_bytes("report.md", b"# r")
    assert (tmp_path / "sweep" / "report.md").read_bytes() == b"# r"


def _forge(store: RecordStore, good: TrialRecord, victim: TrialRecord, forgery: str) -> Path:
    """Put a file that is not a valid record where ``victim``'s record belongs."""
    path = Path(store.path_of(victim.trial_id))
    row = victim.to_row()
    if forgery == "trial_id_only":
        table = pa.table({"trial_id": [victim.trial_id]})
    elif forgery == "status_ok_only":
        table = pa.table({"trial_id": [victim.trial_id], "status": ["ok"], "accuracy": [1.0]})
    elif forgery == "another_spec":  # every column, but the spec of another trial
        row["spec_json"] = good.spec.to_json()
        table = pa.Table.from_pylist([row], schema=record_schema())
    elif forgery == "wrong_type":
        table = pa.Table.from_pylist([row], schema=record_schema())
        table = table.set_column(
            table.schema.get_field_index("accuracy"), "accuracy", pa.array(["0.5"])
        )
    elif forgery == "unknown_status":
        row["status"] = "great"
        table = pa.Table.from_pylist([row], schema=record_schema())
    else:  # "ok_without_accuracy"
        row["accuracy"] = None
        table = pa.Table.from_pylist([row], schema=record_schema())
    pq.write_table(table, path)
    return path


FORGERIES = [
    "trial_id_only",
    "status_ok_only",
    "another_spec",
    "wrong_type",
    "unknown_status",
    "ok_without_accuracy",
]


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_file_that_is_not_a_valid_record_never_counts(
    tmp_path: Path, forgery: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Named like a record, it is checked like one: quarantined, and its trial runs again."""
    from orchestrator.cli import main

    store = RecordStore(tmp_path)
    good, victim = _record(seed=0), _record(seed=1)
    store.write(good)
    path = _forge(store, good, victim, forgery)
    assert RecordStore(tmp_path).existing_ids() == {good.trial_id}
    moved = list((tmp_path / "quarantine").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith(path.name) and not path.exists()

    # the same file met by collect and report: quarantined with a message, no crash
    for command in ("collect", "report"):
        path = _forge(store, good, victim, forgery)
        assert main([command, str(tmp_path)]) == 0
        err = capsys.readouterr().err
        assert f"unreadable record {path.name}" in err and not path.exists()
    frame = RecordStore(tmp_path).collect()
    assert frame["trial_id"].tolist() == [good.trial_id]
    assert set(REQUIRED_COLUMNS) <= set(frame.columns)


def test_columns_newer_than_every_file_are_there_and_empty(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    rec = _record()
    path = store.write(rec)
    pq.write_table(pq.read_table(path).drop_columns(["data_skipped_images", "ckpt_plan"]), path)
    frame = store.collect()
    assert list(frame.columns)[: len(record_schema())] == record_schema().names
    assert frame["data_skipped_images"].isna().all() and frame["ckpt_plan"].isna().all()


def test_a_write_that_fails_names_the_file_and_the_reason_only(tmp_path: Path) -> None:
    """A folder where the record belongs fails even for root: the error is the OS's, once."""
    store = RecordStore(tmp_path)
    rec = _record()
    Path(store.path_of(rec.trial_id)).mkdir()
    with pytest.raises(records_mod.WriteError) as failed:
        store.write(rec)
    assert str(failed.value) == f"cannot write {store.path_of(rec.trial_id)}: Is a directory"
    assert failed.value.__cause__ is not None and failed.value.__cause__.__context__ is None
    assert [p.name for p in Path(store.records_dir).iterdir()] == [f"{rec.trial_id}.parquet"]


def test_retry_failed_quarantines_a_foreign_file_instead_of_failing(
    tiny_grid: dict, write_grid: Callable[[dict], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.cli import main
    from orchestrator.expansion import expand
    from orchestrator.grid import load_grid

    path = write_grid(tiny_grid)
    store = RecordStore(tiny_grid["output"])
    for spec in expand(load_grid(path)):  # every trial recorded: nothing to run, no Ray
        store.write(TrialRecord(spec=spec, status="ok", accuracy=0.5, peak_mem_mb=1.0))
    foreign = Path(store.records_dir) / "0123456789ab.parquet"
    pq.write_table(pa.table({"trial_id": ["0123456789ab"]}), foreign)
    assert main(["run", str(path), "--retry-failed", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "2 trials, 2 already recorded, 0 to run" in captured.out
    assert "unreadable record 0123456789ab.parquet" in captured.err and not foreign.exists()
