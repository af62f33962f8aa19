"""One driver per output folder: the lock file ``OUTPUT/.lock``.

A driver (``orchestrate run`` or ``search``) holds an exclusive ``fcntl.flock`` on the
file while it runs, and writes into it who it is (host, pid, start time) and a heartbeat
that it refreshes every ``HEARTBEAT_S``. A second driver on the same output exits 2
naming the owner. A dead owner does not block for long:

- on one host, the kernel drops a dead process's flock at once;
- the file's owner counts only while it is alive: on this host, while its pid runs (for
  file systems without flock); on another host, while its heartbeat is younger than
  ``STALE_S``. This covers shared file systems whose flock does not reach other hosts
  (NFS mounted ``nolock``, some FUSE), and NFS locks a crashed client left behind.

Two drivers on two hosts of such a file system that start within the same instant can
both pass; nothing short of a lock server closes that gap. Object-store outputs
(``s3://``...) have no lock: run one driver per output there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from orchestrator.records import WriteError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0  # the owner refreshes its heartbeat this often...
STALE_S = 300.0  # ...and one on another host is taken for dead after this long without
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
FILE_BYTES = 512  # the lock file's size while held (the owner's JSON, padded)


class OutputBusy(Exception):
    """The output folder belongs to another live driver."""


@dataclass(frozen=True)
class Owner:
    """The driver that holds a lock, as its lock file says."""

    host: str
    pid: int
    started_at: str  # UTC ISO-8601
    heartbeat: float  # Unix time of its last refresh

    @classmethod
    def me(cls, started_at: str) -> Owner:
        return cls(socket.gethostname(), os.getpid(), started_at, time.time())

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.started_at}"


class OutputLock:
    """``with OutputLock(folder):`` holds ``folder/.lock`` or raises ``OutputBusy``."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._fd = -1
        self._me: Owner | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only output, a folder in the way
            raise WriteError(str(self.path), exc) from exc
        try:
            flocked = _try_flock(fd)
            owner = _read(fd)
            if flocked is False:
                raise OutputBusy(self._busy(owner))
            if owner is not None and _alive(owner, flocked):
                raise OutputBusy(self._busy(owner))
            if owner is not None:
                log.warning(
                    "%s: taking over the lock of a driver that is gone (%s)",
                    self.path,
                    owner.describe(),
                )
            self._me = Owner.me(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            _write(fd, self._me)
        except OSError as exc:
            os.close(fd)  # drops the flock too
            raise WriteError(str(self.path), exc) from exc
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._beat = threading.Thread(target=self._heartbeat, name="output-lock", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Stop the heartbeat, empty the file (an empty file is a free lock) and unlock.
        The file stays: removing it would let two later drivers lock two different files."""
        if self._fd < 0:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        with contextlib.suppress(OSError):  # a read-only output: the flock still goes
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = -1

    def _heartbeat(self) -> None:
        warned = False
        while not self._stop.wait(HEARTBEAT_S):
            assert self._me is not None
            try:
                _write(self._fd, Owner(**{**asdict(self._me), "heartbeat": time.time()}))
            except OSError as exc:  # the sweep finds out when it writes a record
                if not warned:
                    log.warning("cannot refresh the heartbeat of %s: %s", self.path, exc)
                warned = True

    def _busy(self, owner: Owner | None) -> str:
        who = owner.describe() if owner else "owner unknown"
        return (
            f"{self.path.parent} is in use by another driver ({who}; lock file {self.path}): "
            "one driver per output folder; run again once it has ended"
        )


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: no flock on this file system."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in NO_FLOCK:
            return None
        raise
    return True


def _alive(owner: Owner, flocked: bool | None) -> bool:
    """Whether the owner a lock file names still runs (see the module's doc)."""
    if owner.host == socket.gethostname():
        if flocked:  # on this host the kernel would have refused a live owner's lock
            return False
        return _pid_runs(owner.pid)
    return time.time() - owner.heartbeat < STALE_S


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(fd: int) -> Owner | None:
    """The owner the file names; None when it is empty or unreadable (a free lock)."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536)
    try:
        return Owner(**json.loads(text))
    except (ValueError, TypeError):
        return None


def _write(fd: int, owner: Owner) -> None:
    """Overwrite the file in one write of a fixed size, so that a reader never meets a
    mix of two versions (JSON ignores the padding)."""
    data = json.dumps(asdict(owner)).encode().ljust(FILE_BYTES)
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)
