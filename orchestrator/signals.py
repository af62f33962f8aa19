"""SIGINT and SIGTERM as a request to stop a sweep cleanly.

Inside ``StopSignals`` a first SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop) raises
``Interrupted`` at once, unless the code in charge is ``held()``: a sweep loop that
polls ``requested`` and winds down itself (running trials cancelled, records written so
far kept). A second signal always raises at once. The command then exits 128 + the
signal's number (130, 143), and running the same command again resumes the sweep.

Example:
    >>> with StopSignals() as stop, stop.held():  # doctest: +SKIP
    ...     while not stop.requested:
    ...         step()
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):  # noqa: N818 - a stop request, like KeyboardInterrupt
    """The user stopped the command. A BaseException, so that no ``except Exception``
    (which turns a trial's error into a record) takes it for an error."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 130 SIGINT, 143 SIGTERM."""
        return 128 + self.signum


class StopSignals:
    """While entered, SIGINT and SIGTERM are stop requests (see the module's doc)."""

    def __init__(self) -> None:
        self.signum = 0  # the first signal received; 0: none
        self._held = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # else Python refuses
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(
        self, kind: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A first signal only sets ``requested``: the code inside stops by itself."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1

    def check(self) -> None:
        """Raise ``Interrupted`` when a stop was requested."""
        if self.signum:
            raise Interrupted(self.signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = not self.signum
        self.signum = self.signum or signum
        if first and self._held:
            log.warning("%s: stopping the sweep", signal.Signals(signum).name)
            return
        raise Interrupted(self.signum)
