"""Parts of the record store: group commits and compaction of small record files.

``OUTPUT/records/`` is one Parquet dataset of two kinds of files:

- ``<trial_id>.parquet``: one record (``RecordStore.write``; every older output);
- ``part-<time>-<rows>-<id>.parquet``: several records, written whole by a group commit
  (``RecordStore.write_many``: one file and one fsync for records that finish together)
  or by a compaction.

A compaction merges small files into one larger part, size-tiered: files with fewer than
``fanout``, ``fanout**2``, ``fanout**3`` rows form tiers 0, 1, 2; ``fanout`` files of a
tier become one file of a higher tier, so at 10^5 records ``records/`` holds a few dozen
files and each record is rewritten at most three times. ``everything=True`` merges all
files into parts of at most ``max_rows`` rows.

A kill at any instant loses and duplicates nothing. A merge first writes an intent
(``OUTPUT/_compaction/<id>.json``: the parts it will write, its inputs with their size and
modification time), then the parts (each atomically), then deletes the inputs, then the
intent. ``recover`` (run before any compaction and when a driver lists its records)
finishes a merge whose parts all exist and rolls back one whose parts do not: the inputs
are whole until every part is. An input that changed after it was read (a record written
again) is never deleted. In the instant between a part's rename and its inputs' deletion
(or after a kill there, until ``recover``) a trial's row is in two files: the store's
readers keep the newest row of every trial (``recorded_at``), and tools that read
``records/`` directly see one row per trial again once the merge is over.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from orchestrator.records import RecordStore

log = logging.getLogger(__name__)

PART_PREFIX = "part-"
INTENTS = "_compaction"  # folder beside records/ holding the intents of running merges
FANOUT = 16  # files of a tier merged at once; also how many writes trigger a compaction
MAX_PART_ROWS = 65_536  # rows of a part written by a full compaction
_PART_NAME = re.compile(r"^part-\d{20}-(\d{6,})-[0-9a-f]{8}\.parquet$")


@dataclass(frozen=True)
class StoredFile:
    """A file of ``records/`` as listed: its path, size and modification time."""

    path: str
    size: int
    mtime_ns: int

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def rows(self) -> int:
        """Rows the file holds by its name (1 for a single record)."""
        match = _PART_NAME.match(self.name)
        return int(match.group(1)) if match else 1


def part_name(rows: int) -> str:
    """A new part's file name: creation time first, so names sort by age."""
    return f"{PART_PREFIX}{time.time_ns():020d}-{rows:06d}-{uuid.uuid4().hex[:8]}.parquet"


def is_part(name: str) -> bool:
    return name.startswith(PART_PREFIX)


# ---------------------------------------------------------------- checking a part


def check_part_rows(table: pa.Table, statuses: tuple[str, ...]) -> str | None:
    """What is wrong with the rows of a part (None: nothing), vectorised: each
    ``trial_id`` is the hash of its row's ``spec_json`` (the canonical JSON it was made
    from) and appears once, each ``status`` is known, an ``ok`` finetune has an accuracy
    in [0, 1]."""
    ids = table["trial_id"].to_pylist()
    specs = table["spec_json"].to_pylist()
    for trial_id, spec in zip(ids, specs, strict=True):
        if spec is None or hashlib.sha256(spec.encode()).hexdigest()[:12] != trial_id:
            return f"row {trial_id!r}: its spec_json does not hash to its trial_id"
    if len(set(ids)) != len(ids):
        return "a trial_id appears twice"
    unknown = pc.invert(pc.is_in(table["status"], pa.array(statuses)))
    if pc.any(unknown).as_py():
        bad = table.filter(unknown)["status"][0].as_py()
        return f"status {bad!r} is none of {', '.join(statuses)}"
    accuracy = pc.fill_null(table["accuracy"].cast(pa.float64()), float("nan"))
    in_range = pc.and_(pc.greater_equal(accuracy, 0.0), pc.less_equal(accuracy, 1.0))
    ok_finetune = pc.and_(pc.equal(table["status"], "ok"), pc.equal(table["kind"], "finetune"))
    if pc.any(pc.and_(ok_finetune, pc.invert(in_range))).as_py():
        return "status ok without an accuracy in [0, 1]"
    return None


# ---------------------------------------------------------------- the newest row per trial


def newest_per_trial(table: pa.Table) -> pa.Table:
    """One row per ``trial_id``, sorted by it: the one with the latest ``recorded_at``
    (empty counts as oldest), ties going to the higher ``_source`` (a column the caller
    adds and this drops: later files of its listing)."""
    keys = pa.table(
        {
            "trial_id": table["trial_id"],
            "recorded_at": pc.fill_null(table["recorded_at"], ""),
            "source": table["_source"],
        }
    )
    order = pc.sort_indices(keys, sort_keys=[(name, "ascending") for name in keys.column_names])
    ids = keys["trial_id"].take(order).combine_chunks()
    if len(ids) > 1:  # keep the last row of every trial id
        changes = pc.not_equal(ids.slice(0, len(ids) - 1), ids.slice(1))
        order = order.filter(pa.concat_arrays([changes, pa.array([True])]))
    table = table.take(order)  # the one copy of the rows
    return table.drop_columns(["_source"])


# ---------------------------------------------------------------- compaction


def compact(
    store: RecordStore,
    *,
    everything: bool = False,
    fanout: int = FANOUT,
    max_rows: int = MAX_PART_ROWS,
) -> int:
    """Merge ``store``'s small record files (see the module's doc); returns the number of
    parts written (0 also while another process compacts the same output)."""
    with _exclusive(store) as alone:
        if not alone:
            return 0
        _recover(store)
        if everything:
            files = store.listing()
            return _merge(store, files, max_rows) if len(files) > 1 else 0
        return _tiered(store, fanout)


def _tiered(store: RecordStore, fanout: int) -> int:
    written = 0
    while (group := _full_tier(store.listing(), fanout)) is not None:
        merged = _merge(store, group, max_rows=fanout**4)
        if not merged:
            break  # an input vanished or all were quarantined: leave the rest for later
        written += merged
    return written


def _full_tier(files: list[StoredFile], fanout: int) -> list[StoredFile] | None:
    """The files of the lowest tier that holds ``fanout`` files, or None."""
    tiers: dict[int, list[StoredFile]] = {}
    for f in files:
        tier = 0
        while f.rows >= fanout ** (tier + 1):
            tier += 1
        if tier < 3:
            tiers.setdefault(tier, []).append(f)
    for tier in sorted(tiers):
        if len(tiers[tier]) >= fanout:
            return tiers[tier]
    return None


def _merge(store: RecordStore, files: list[StoredFile], max_rows: int) -> int:
    """Write the records of ``files`` as parts of at most ``max_rows`` rows, then delete
    ``files``; the intent makes it all-or-nothing. Returns the parts written (0: nothing
    was changed)."""
    table = store.combine(files)
    if table is None:
        return 0
    chunks = [table.slice(i, max_rows) for i in range(0, max(table.num_rows, 1), max_rows)]
    parts = [f"{store.records_dir}/{part_name(c.num_rows)}" for c in chunks]
    intent = {
        "parts": parts,
        "inputs": [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns} for f in files],
    }
    intent_path = f"{store.inner(INTENTS)}/{uuid.uuid4().hex}.json"
    store.write_bytes_at(intent_path, json.dumps(intent).encode())
    for path, chunk in zip(parts, chunks, strict=True):
        store.write_table_at(path, chunk)
    _finish(store, intent_path, intent)
    log.debug("compacted %d files into %d parts", len(files), len(parts))
    return len(parts)


def _finish(store: RecordStore, intent_path: str, intent: dict[str, Any]) -> None:
    """Delete a finished merge's inputs that are as it read them, then its intent."""
    for item in intent["inputs"]:
        now = store.stat(item["path"])
        if now is None:
            continue
        if (now.size, now.mtime_ns) == (item["size"], item["mtime_ns"]):
            store.delete(item["path"])
        else:
            log.warning("%s changed while it was compacted: kept", item["path"])
    store.sync_records_dir()
    store.delete(intent_path)


@contextlib.contextmanager
def _exclusive(store: RecordStore) -> Iterator[bool]:
    """Whether this process alone compacts the output: a flock on ``_compaction/.lock``,
    released by the kernel when its process dies, so two writers of one output never
    merge at once nor roll back each other's merge in flight. An object store has no
    lock (one driver per such output, as orchestrator.lock says)."""
    if store.is_uri:
        yield True
        return
    folder = store.inner(INTENTS)
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(f"{folder}/.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a read-only output: nothing can be merged or recovered
        log.debug("cannot lock %s (%s): no compaction", folder, exc)
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError as exc:  # a file system without flock: the output lock must do
            log.debug("no flock on %s (%s)", folder, exc)
        yield True
    finally:
        os.close(fd)


def recover(store: RecordStore) -> None:
    """Finish or roll back every merge a kill interrupted (see the module's doc), unless
    another process is compacting the output now."""
    with _exclusive(store) as alone:
        if alone:
            _recover(store)


def _recover(store: RecordStore) -> None:
    _remove_temporaries(store, f"{store.inner(INTENTS)}/")  # intents whose write was cut
    for intent_path in store.list_folder(store.inner(INTENTS), ".json"):
        try:
            intent = json.loads(store.read_bytes(intent_path))
            parts = intent["parts"]
            intent["inputs"]  # noqa: B018 - a malformed intent fails here, not half-way
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("compaction intent %s is unreadable (%s): left as it is", intent_path, exc)
            continue
        if all(store.stat(p) is not None for p in parts):
            log.info("finishing the compaction %s that was interrupted", intent_path)
            _finish(store, intent_path, intent)
            continue
        log.info("rolling back the compaction %s that was interrupted", intent_path)
        for part in parts:
            store.delete(part)
            _remove_temporaries(store, part)
        store.sync_records_dir()
        store.delete(intent_path)  # the inputs, untouched, are the records


def _remove_temporaries(store: RecordStore, path: str) -> None:
    """A killed atomic write leaves ``.<name>.<pid>.<id>.tmp`` beside its target (``path``;
    every one in the folder for ``folder/``)."""
    folder, name = os.path.split(path)
    if store.is_uri or not os.path.isdir(folder):
        return
    for entry in os.scandir(folder):
        if entry.name.startswith(f".{name}") and entry.name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
