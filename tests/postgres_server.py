"""A throwaway PostgreSQL server for tests: ``initdb`` in a temporary folder, the server on
a free local port and its own unix socket, and a database per URL asked for.

PostgreSQL refuses to run as root: as root the server runs as ``nobody`` (``setpriv``
from util-linux), in a folder that user owns. The binaries are looked up on PATH, then
in Debian's ``/usr/lib/postgresql/<version>/bin`` (``make postgresql`` installs them).

    with PostgresServer.start() as server:
        url = server.create_database("search")  # postgresql+psycopg://...
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

BINARIES = ("initdb", "postgres")
DEBIAN_BIN = Path("/usr/lib/postgresql")
USER = "vramsweep"  # the database superuser initdb creates (trust authentication, local only)
READY_S = 60.0  # longest wait for the server to accept connections (a loaded machine)
MISSING = (
    "PostgreSQL server binaries (initdb, postgres) not found on PATH or under "
    "/usr/lib/postgresql/*/bin: run `make postgresql` (Debian's postgresql, through apt)"
)


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says why and what to do."""


def find_bin_dir() -> Path:
    """The folder holding ``initdb`` and ``postgres`` (newest Debian version first)."""
    on_path = [shutil.which(name) for name in BINARIES]
    if all(on_path):
        return Path(os.path.realpath(on_path[0] or "")).parent
    versions = sorted(DEBIAN_BIN.glob("*/bin"), key=lambda p: p.parent.name, reverse=True)
    for folder in versions:
        if all((folder / name).is_file() for name in BINARIES):
            return folder
    raise PostgresUnavailable(MISSING)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server_user() -> tuple[list[str], int | None]:
    """The command prefix that runs the server as a user PostgreSQL accepts, and that
    user's id when it is not the current one (root: ``nobody``)."""
    if os.geteuid() != 0:
        return [], None
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise PostgresUnavailable("running as root, and setpriv (util-linux) is missing")
    nobody = pwd.getpwnam("nobody")
    prefix = [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    return prefix, nobody.pw_uid


@dataclass
class PostgresServer:
    """A running server (``start``); ``stop`` ends it and removes its folder."""

    folder: Path
    port: int
    process: subprocess.Popen[bytes]

    @classmethod
    def start(cls) -> PostgresServer:
        bin_dir = find_bin_dir()
        prefix, uid = _as_server_user()
        folder = Path(tempfile.mkdtemp(prefix="vramsweep-pg-"))
        if uid is not None:
            os.chown(folder, uid, -1)
        data, log = folder / "data", folder / "server.log"
        init = subprocess.run(
            [*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", USER]
            + ["--auth=trust", "--encoding=UTF8", "--no-sync"],
            capture_output=True,
            text=True,
        )
        if init.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            raise PostgresUnavailable(f"initdb failed: {init.stderr.strip()[-500:]}")
        port = _free_port()
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*prefix, str(bin_dir / "postgres"), "-D", str(data), "-k", str(folder)]
                + ["-h", "127.0.0.1", "-p", str(port)]
                # a test database: durability is not wanted, speed on a loaded machine is
                + ["-c", "fsync=off", "-c", "synchronous_commit=off"]
                + ["-c", "full_page_writes=off", "-c", "max_connections=60"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = cls(folder, port, process)
        server._wait_ready(log)
        return server

    def _wait_ready(self, log: Path) -> None:
        import psycopg

        deadline = time.monotonic() + READY_S
        while True:
            if self.process.poll() is not None:
                text = log.read_text(errors="replace")[-800:]
                self.stop()
                raise PostgresUnavailable(f"postgres exited at start: {text}")
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise PostgresUnavailable(f"postgres not ready after {READY_S:g} s") from None
                time.sleep(0.2)

    def dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} dbname={database}"

    def url(self, database: str) -> str:
        """SQLAlchemy's URL of a database (driver psycopg 3)."""
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its URL."""
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL if it takes over 30 s; the folder is removed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with suppress(OSError):
            shutil.rmtree(self.folder)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
