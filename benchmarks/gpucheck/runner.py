"""Runs one part of the check in a fresh Python process, killed at its time limit.

A fresh interpreter per part (not a fork of this process): no CUDA state can leak from
one part into the next, a part that crashes the interpreter or runs out of host memory
loses only itself, and this process never creates a CUDA context (which NVML would
count as another process on the GPU during the energy part). The part's process and
everything it started (the packing part's workers) form one process group, killed
together at the limit. What the part wrote before it died is kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.gpucheck.parts import Part

ROOT = Path(__file__).resolve().parents[2]
LOG_LINES = 25  # tail of a part's output kept in the report
TERM_GRACE_S = 5.0  # between SIGTERM and SIGKILL


def python_env() -> dict[str, str]:
    """This environment with the repository on the import path (the device machine has
    no installed vramsweep) and unbuffered output."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def part_command(part: Part, out: Path, device: str, tiny: bool, limit_s: float) -> list[str]:
    command = [sys.executable, "-m", "benchmarks.gpucheck.part", part.name, "--out", str(out)]
    command += ["--device", device, "--limit-s", f"{limit_s:g}"]
    return command + (["--tiny"] if tiny else [])


def run_part(part: Part, scratch: Path, device: str, tiny: bool, limit_s: float) -> dict[str, Any]:
    """Run ``part``; its result document (see ``report``) with wall time and log tail."""
    out, log = scratch / f"{part.name}.json", scratch / f"{part.name}.log"
    command = part_command(part, out, device, tiny, limit_s)
    start = time.monotonic()
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=python_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code: int | None = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            code = None
            _kill_group(proc)
        _kill_stragglers(proc)
    result = _read(out)
    result.update(wall_s=round(time.monotonic() - start, 2), limit_s=limit_s)
    result["log_tail"] = _tail(log)
    if code is None:
        result["status"] = "timeout"
        result["reason"] = f"killed at its limit of {limit_s:g} s; figures measured before kept"
    elif result["status"] not in ("ok", "failed"):  # died before it could say
        result["status"] = "crashed"
        result["reason"] = f"the part's process exited with code {code} before finishing"
    return result


def skipped(reason: str) -> dict[str, Any]:
    return {
        "status": "skipped",
        "reason": reason,
        "figures": [],
        "notes": [],
        "environment": {},
        "wall_s": 0.0,
        "limit_s": 0.0,
        "log_tail": [],
    }


def _read(out: Path) -> dict[str, Any]:
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        result = {}
    result.setdefault("status", "crashed")
    result.setdefault("reason", "")
    for key, empty in (("figures", []), ("notes", []), ("environment", {})):
        result.setdefault(key, empty)
    result.pop("part", None)
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the part's process group; SIGKILL whatever is left after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=TERM_GRACE_S)
    _kill_stragglers(proc)
    proc.wait()


def _kill_stragglers(proc: subprocess.Popen) -> None:
    """Processes the part left behind in its group (its workers, after a failure)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(log: Path) -> list[str]:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return lines[-LOG_LINES:]
