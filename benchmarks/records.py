"""The record store at scale: writing and collecting 10^4 and 10^5 records.

For each size N, N records of a realistic mix (three methods with their own arguments,
every status) are written into a fresh output folder the way a sweep ends them, in
groups of trials that finish together (``RecordStore.write_many``, compaction as it
runs by itself), and collected (``RecordStore.collect``: checked, newest row per trial,
flat argument columns, pandas). Side by side, the peer: the same rows in one Parquet
file, written once (``pyarrow.parquet.write_table``) and read with
``pandas.read_parquet``. Collect times are medians of interleaved repeats. Also: one
``write`` per record (a durable file each, what a slow sweep does), and collect of a
folder as older versions left it (one file per record) for a part of N.

    .venv/bin/python benchmarks/records.py [--sizes 10000 100000] [--group 32] [--repeats 3]

Targets (issue 22): collect 10k <= 1 s, 100k <= 5 s; amortized write <= 2 ms per record.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.records import RecordStore, TrialRecord, _row_schema
from orchestrator.spec import TrainConfig, TrialSpec

METHODS = (
    ("lora", {"r": 8, "alpha": 16.0, "dropout": 0.05, "target": ["qkv", "proj"]}),
    ("bitfit", {}),
    ("snella", {"rank": 4, "sparsity": 0.5}),
)
STATUSES = ("ok", "ok", "ok", "oom", "over_budget", "failed")


def make_records(n: int) -> list[TrialRecord]:
    """``n`` distinct records: methods, ranks, learning rates, seeds and statuses vary."""
    trains = [TrainConfig(epochs=3, lr=lr, batch_size=b) for lr in (1e-3, 5e-4) for b in (32, 64)]
    records = []
    for i in range(n):
        method, args = METHODS[i % len(METHODS)]
        if method == "lora":
            args = {**args, "r": (4, 8, 16)[i // 3 % 3]}
        spec = TrialSpec(
            backbone="vit_small_patch16_224",
            method=method,
            method_args=args,
            checkpointing=("none", "static", "adaptive")[i // 9 % 3],
            dataset="cifar100",
            dataset_args={"image_size": 224},
            train=trains[i // 27 % len(trains)],
            seed=i,
        )
        status = STATUSES[i % len(STATUSES)]
        ok = status == "ok"
        records.append(
            TrialRecord(
                spec=spec,
                status=status,
                error="" if ok else f"{status}: trial {i}",
                accuracy=(i % 100) / 100 if ok else None,
                peak_mem_mb=1000.0 + i % 997,
                mem_source="accounted",
                train_time_s=10.0 + i % 13,
                energy_j=500.0 + i % 71,
                energy_source="estimated",
                params_total=22_000_000,
                params_trainable=10_000 + i,
                macs=4_600_000_000,
                host="bench",
                started_at="2026-12-06T00:00:00Z",
                ended_at="2026-12-06T00:01:00Z",
            )
        )
    return records


def _timed(fn) -> float:  # noqa: ANN001 - any callable
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(n: int, group: int, repeats: int, legacy: int, workdir: Path) -> None:
    records = make_records(n)
    out = workdir / f"sweep{n}"
    store = RecordStore(out)
    write_s = _timed(lambda: [store.write_many(records[i : i + group]) for i in range(0, n, group)])
    files = len(store.listing())

    peer_file = workdir / f"peer{n}.parquet"
    peer_write_s = _timed(
        lambda: pq.write_table(
            pa.Table.from_pylist([r.to_row() for r in records], schema=_row_schema()), peer_file
        )
    )

    ours, peer = [], []
    for _ in range(repeats):  # interleaved: both arms see the same machine load
        ours.append(_timed(lambda: RecordStore(out).collect()))
        peer.append(_timed(lambda: pd.read_parquet(peer_file)))
    frame = RecordStore(out).collect()
    assert len(frame) == n and frame["trial_id"].is_unique
    assert (frame.loc[frame["method"] == "lora", "method.r"].dropna() > 0).all()

    single = RecordStore(workdir / f"single{n}", compact_every=0)
    few = records[:legacy]
    single_s = _timed(lambda: [single.write(r) for r in few])
    legacy_s = _timed(lambda: RecordStore(single.output).collect())

    ours_s, peer_s = statistics.median(ours), statistics.median(peer)
    print(f"\n{n:,} records ({files} files after writing in groups of {group})")
    print(f"  {'measure':44s} {'vramsweep':>12s} {'peer':>12s} {'ratio':>7s}")
    print(
        f"  {'collect, s (median of ' + str(repeats) + ')':44s} {ours_s:12.3f} {peer_s:12.3f} "
        f"{ours_s / peer_s:7.2f}"
    )
    print(f"    range                                      {min(ours):.3f}-{max(ours):.3f}")
    per_ours, per_peer = write_s / n * 1e3, peer_write_s / n * 1e3
    print(
        f"  {'write, ms per record (amortized)':44s} {per_ours:12.3f} {per_peer:12.3f} "
        f"{per_ours / per_peer:7.2f}"
    )
    label = f"one write() per record, ms ({legacy})"
    print(f"  {label:44s} {single_s / legacy * 1e3:12.3f}")
    print(
        f"  {'collect of ' + str(legacy) + ' one-record files (old layout), s':44s} "
        f"{legacy_s:12.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--group", type=int, default=32, help="records per group commit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--legacy", type=int, default=500, help="records written one by one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            measure(n, args.group, args.repeats, args.legacy, Path(tmp))


if __name__ == "__main__":
    main()
