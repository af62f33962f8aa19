"""Group commit of records off a driver's event loop.

A driver hands each finished trial's record to ``GroupCommit.put`` and goes on at once;
one background thread makes the records durable through ``RecordStore.write_many``:
whatever arrived while the previous group was being written becomes the next group (one
Parquet file, one fsync), so trials that end close together share a write and the event
loop never waits for a disk. While records come faster than one per ``linger_s`` and
more are coming (other trials run), a group also waits ``linger_s`` for more (a write
holds the interpreter's lock for part of its ~14 ms: one per trial lengthened the
driver's turnaround between two short trials from ~22 to ~35 ms); any other record is
written at once. ``flush`` returns
once everything put before it is durable, without lingering. A record counts as recorded
only then: a driver killed before its flush loses the trials in flight, which have no
record and are run again on resume, as if they had not finished; nothing durable is
lost or written twice.

Example:
    >>> with GroupCommit(store) as records:  # doctest: +SKIP
    ...     records.put(record)              # returns at once
    >>> # here every record put is durable (or the write error was raised)
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from orchestrator.records import RecordStore, TrialRecord, WriteError

log = logging.getLogger(__name__)


class GroupCommit:
    """Writes the records given to ``put`` in groups, in a thread of its own.

    After a write error nothing more is written: ``error`` holds it, ``put`` and ``flush``
    raise it (the records of the failed group and those after it are not durable).
    """

    def __init__(
        self,
        store: RecordStore,
        linger_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.linger_s = linger_s
        self.clock = clock
        self._last_put = -math.inf
        self._linger = False  # the last record came within linger_s, and more are coming
        self.error: WriteError | None = None
        self.groups: list[int] = []  # size of every group written, in order
        self._pending: list[TrialRecord] = []
        self._writing = False
        self._closed = False
        self._flushing = 0  # callers waiting in flush: no lingering for them
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def put(self, record: TrialRecord, more_coming: bool = True) -> None:
        """Queue ``record`` for the next group; raises an earlier write's error.
        ``more_coming``: other records may follow soon (trials still run)."""
        with self._changed:
            if self.error is not None:
                raise self.error
            if self._closed:
                raise RuntimeError("GroupCommit.put after close")
            now = self.clock()
            self._linger = more_coming and now - self._last_put < self.linger_s
            self._last_put = now
            self._pending.append(record)
            self._changed.notify_all()

    def flush(self) -> None:
        """Wait until every record put so far is durable; raises a write's error."""
        with self._changed:
            self._flushing += 1
            self._changed.notify_all()
            try:
                self._changed.wait_for(
                    lambda: self.error is not None or not (self._pending or self._writing)
                )
            finally:
                self._flushing -= 1
            if self.error is not None:
                raise self.error

    def close(self) -> None:
        """Flush, then end the thread. Idempotent; leaves a write error in ``error``."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join()

    def __enter__(self) -> GroupCommit:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        if kind is None and self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closed)
                if not self._pending:  # closed, and everything written
                    return
                if self._linger:  # those that end within linger_s join this group
                    self._changed.wait_for(lambda: self._closed or self._flushing, self.linger_s)
                group, self._pending = self._pending, []
                self._writing = True
            error = self._write(group)
            with self._changed:
                self._writing = False
                self.error = error
                self._changed.notify_all()
                if error is not None:
                    return

    def _write(self, group: Sequence[TrialRecord]) -> WriteError | None:
        try:
            self.store.write_many(group)
        except Exception as exc:  # noqa: BLE001 - any failure must reach the driver, not hang it
            error = exc if isinstance(exc, WriteError) else WriteError(self.store.records_dir, exc)
            log.error("%d records not written: %s", len(group), error)
            return error
        self.groups.append(len(group))
        return None
