"""Where a sweep writes: a grid's ``output`` checked at validation, creating nothing and
contacting nothing (``validate`` and ``run --dry-run`` must not write or reach the network).

A local output must be able to become a writable folder: it is one already, or its
nearest existing parent is a folder this user may write into. It is resolved against
the working folder, as the record store does; ``..`` may lead anywhere that passes
these checks, except the system folders below, which hold no sweep even as root. A URI
must name a scheme the record store (pyarrow) writes to and a bucket or host; whether
that store is reachable is found out by the run itself.

Example:
    >>> output_problem("s3://bucket/sweeps/smoke") is None
    True
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

# pyarrow.fs.FileSystem.from_uri's schemes (file:// is a local path)
URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")
# never a sweep's folder: kernel file systems, and the system's own folders
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev", "/etc", "/boot", "/bin", "/sbin", "/lib", "/usr")


def output_problem(output: str) -> str | None:
    """Why ``output`` cannot hold a sweep's records, or None when it can."""
    if "\x00" in output:
        return "contains a NUL character"
    if "://" in output:
        return _uri_problem(output)
    return _folder_problem(Path(output).expanduser())


def _uri_problem(output: str) -> str | None:
    parts = urlsplit(output)
    if parts.scheme not in URI_SCHEMES:
        return (
            f"{parts.scheme!r} is not a scheme records can be written to ({', '.join(URI_SCHEMES)})"
        )
    if parts.scheme == "file":
        return _folder_problem(Path(parts.path)) if parts.path else "a file:// URI needs a path"
    if not parts.netloc:
        return f"a {parts.scheme}:// URI needs a bucket or host"
    return None


def _folder_problem(path: Path) -> str | None:
    try:
        target = Path(os.path.abspath(path))
        real = target.resolve()  # symlinks followed, nothing created
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        return f"not a usable path ({exc})"
    if real == Path(real.anchor):
        return "is the root folder"
    system = [s for s in SYSTEM_FOLDERS if real == Path(s) or Path(s) in real.parents]
    if system:
        return f"resolves to {real}, under the system folder {system[0]}"
    existing = real
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as exc:
        return f"not a usable path ({exc.strerror})"
    if not existing.is_dir():
        what = "is" if existing == real else f"lies under {existing}, which is"
        return f"{what} an existing file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write into {existing} (permission denied)"
    records = real / "records"  # the store's own folder, if there already
    if records.exists() and not (records.is_dir() and os.access(records, os.W_OK | os.X_OK)):
        return f"{records} is there and is not a writable folder"
    return None
