"""Records easy to query: flat typed argument columns, documented collected files, and
records of older schema versions (tests/fixtures/records) beside current ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.cli import main
from orchestrator.records import SCHEMA_VERSION, RecordStore, TrialRecord
from orchestrator.spec import TrainConfig, TrialSpec

FIXTURES = Path(__file__).parents[1] / "fixtures" / "records"


def _record(method: str, args: dict, lr: float, seed: int = 0) -> TrialRecord:
    spec = TrialSpec(
        backbone="vit_test",
        method=method,
        method_args=args,
        dataset="digits",
        dataset_args={"image_size": 32},
        seed=seed,
        train=TrainConfig(epochs=2, lr=lr, batch_size=16 if method == "bitfit" else 32),
    )
    return TrialRecord(spec=spec, status="ok", accuracy=0.5 + seed / 100, peak_mem_mb=10.0)


@pytest.fixture
def sweep(tmp_path: Path) -> tuple[RecordStore, list[TrialRecord]]:
    store = RecordStore(tmp_path / "out")
    records = [
        _record("lora", {"r": 8, "alpha": 16, "target": ["qkv", "proj"]}, 5e-4, seed=0),
        _record("lora", {"r": 4, "alpha": 8.5, "target": ["qkv"]}, 2e-3, seed=1),
        _record("bitfit", {}, 1e-3, seed=2),
    ]
    store.write(records[0])
    store.write_many(records[1:])  # a single file and a part: the columns meet at reading
    return store, records


def test_flat_columns_are_typed_and_select_trials(sweep: tuple) -> None:
    store, records = sweep
    table = store.read_table()
    types = {n: str(table.schema.field(n).type) for n in table.column_names if "." in n}
    assert types["method.r"] == "int64" and types["train.batch_size"] == "int64"
    assert types["method.alpha"] == "double"  # 16 and 8.5: ints and floats mixed
    assert types["train.lr"] == "double" and types["method.target"] == "string"
    assert types["dataset.image_size"] == "int64"
    frame = store.collect()
    assert frame.loc[frame["method.r"] == 8, "trial_id"].tolist() == [records[0].trial_id]
    assert frame.loc[frame["train.lr"] < 1e-3, "trial_id"].tolist() == [records[0].trial_id]
    bitfit = frame.set_index("trial_id").loc[records[2].trial_id]
    assert pd.isna(bitfit["method.r"]) and bitfit["train.batch_size"] == 16
    lora4 = frame.set_index("trial_id").loc[records[1].trial_id]
    assert lora4["method.target"] == '["qkv"]' and lora4["method.alpha"] == 8.5


def test_duckdb_queries_the_records_folder_and_the_collected_file(
    sweep: tuple, tmp_path: Path
) -> None:
    store, records = sweep
    files = f"{store.records_dir}/*.parquet"
    query = "SELECT trial_id FROM read_parquet(?, union_by_name=true) WHERE {} ORDER BY 1"
    rows = duckdb.execute(query.format('"train.lr" < 1e-3'), [files]).fetchall()
    assert rows == [(records[0].trial_id,)]
    rows = duckdb.execute(query.format('"method.r" = 4'), [files]).fetchall()
    assert rows == [(records[1].trial_id,)]
    out = tmp_path / "all.parquet"
    assert main(["collect", store.output, "--out", str(out)]) == 0
    rows = duckdb.execute(query.format('"method.r" >= 4'), [str(out)]).fetchall()
    assert rows == sorted((r.trial_id,) for r in records[:2])


def test_collect_out_keeps_each_columns_documentation(sweep: tuple, tmp_path: Path) -> None:
    store, records = sweep
    out = tmp_path / "all.parquet"
    assert main(["collect", store.output, "--out", str(out)]) == 0
    schema = pq.read_schema(out)
    doc = {f.name: (f.metadata or {}).get(b"doc", b"").decode() for f in schema}
    assert doc["accuracy"] == "top-1 accuracy, fraction in [0, 1]"
    assert doc["train.lr"].startswith("grid `train.lr`")
    assert doc["method.r"].startswith("method argument `r` from method_args")
    assert all(doc[n] for n in schema.names), [n for n in schema.names if not doc[n]]
    assert schema.metadata[b"vramsweep_schema_version"] == str(SCHEMA_VERSION).encode()
    assert pq.read_table(out).num_rows == len(records)


def test_version_6_and_7_records_collect_resume_and_compact_beside_version_8(
    tmp_path: Path,
) -> None:
    """The fixtures were written by the records.py of schema 6 and of schema 7."""
    out = tmp_path / "out"
    for version in (6, 7):
        shutil.copytree(FIXTURES / f"v{version}" / "records", out / "records", dirs_exist_ok=True)
    old_ids = {p.stem for p in (out / "records").glob("*.parquet")}
    store = RecordStore(out)
    new = _record("lora", {"r": 8, "alpha": 16.0, "dropout": 0.0}, 5e-4, seed=8)
    store.write(new)
    assert store.existing_ids() == old_ids | {new.trial_id}
    frame = store.collect().set_index("trial_id")
    assert sorted(frame["schema_version"].unique()) == [6, 7, SCHEMA_VERSION]
    lora_r8 = frame[frame["method.r"] == 8]
    assert sorted(lora_r8["schema_version"]) == [6, 7, SCHEMA_VERSION]  # derived from the JSON
    assert set(frame.loc[frame["schema_version"] == 6, "train.lr"]) == {5e-4, 2e-3, 1e-3}
    assert frame.loc[frame["schema_version"] < 8, "eval_peak_mem_mb"].isna().sum() >= 3
    assert frame.loc[frame["schema_version"] < 8, "recorded_at"].isna().all()
    assert (frame.loc[frame["kind"] == "baseline", "baseline.k"] == 20).all()

    assert store.compact(everything=True) == 1  # the old files become one part
    assert [p.name[:5] for p in (out / "records").glob("*.parquet")] == ["part-"]
    again = RecordStore(out).collect().set_index("trial_id")
    pd.testing.assert_frame_equal(again[frame.columns], frame)
    back = RecordStore(out).read_record(sorted(old_ids)[0])
    assert back.trial_id == sorted(old_ids)[0]


def test_a_record_of_a_newer_version_keeps_its_extra_columns(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    rec = _record("lora", {"r": 8}, 5e-4)
    path = store.write(rec)
    table = pq.read_table(path)
    pq.write_table(table.append_column("future_mb", pa.array([1.5])), path)
    frame = store.collect()
    assert frame["future_mb"].tolist() == [1.5] and frame["method.r"].tolist() == [8]


def test_argument_values_of_every_shape_get_a_column_and_never_fail_a_write(
    tmp_path: Path,
) -> None:
    store = RecordStore(tmp_path)
    odd = [
        {"big": 2**70, "mixed": True, "nested": {"a": {"b": 1}}, "items": [{"x": 1}]},
        {"big": 3, "mixed": 1, "nested": {"a": {"b": 2.5}}, "none": None},
    ]
    store.write_many([_record("lora", args, 1e-3, seed=i) for i, args in enumerate(odd)])
    table = store.read_table()
    by_seed = {s: i for i, s in enumerate(table["seed"].to_pylist())}
    column = {n: table[n].to_pylist() for n in table.column_names if n.startswith("method.")}
    assert str(table.schema.field("method.big").type) == "string"  # past int64
    assert column["method.big"][by_seed[0]] == str(2**70)
    assert column["method.mixed"][by_seed[0]] == "true"  # bool beside int: text
    assert str(table.schema.field("method.nested.a.b").type) == "double"
    assert column["method.nested.a.b"][by_seed[1]] == 2.5
    assert column["method.items"][by_seed[0]] == '[{"x":1}]'
    assert column["method.none"] == [None, None]
