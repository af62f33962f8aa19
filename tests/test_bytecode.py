"""`make bytecode` (a step of `make demo` and `make test`): afterwards a process that may
not write bytecode (PYTHONDONTWRITEBYTECODE, as in many container images) loads the code
that every warm Ray worker imports from the cache, compiling none of it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from orchestrator.warm_workers import TRIAL_MODULES

REPO = Path(__file__).resolve().parents[1]
# what `make bytecode` compiles: the Makefile's PACKAGES
PACKAGES = re.search(r"^PACKAGES := (.+)$", (REPO / "Makefile").read_text(), re.M)[1].split()


def _compiled_from(folder: Path) -> dict[str, str]:
    """Import ``TRIAL_MODULES`` from the packages in ``folder`` as a warm worker would
    (no bytecode written); each module file of ``folder`` that was compiled -> what its
    code came from (``.py``: compiled now; ``.pyc``: the cache)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(folder)}
    code = "import " + ", ".join(TRIAL_MODULES)
    run = subprocess.run(
        [sys.executable, "-v", "-c", code], cwd=folder, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    sources = re.findall(r"^# code object from '?([^'\n]+)'?$", run.stderr, re.MULTILINE)
    return {s: Path(s).suffix for s in sources if s.startswith(str(folder))}


def test_warm_workers_load_the_trial_code_from_bytecode(tmp_path: Path) -> None:
    shutil.copy(REPO / "Makefile", tmp_path)
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )

    before = _compiled_from(tmp_path)
    assert len(before) > 20  # the trial code is many modules, all from the copy
    assert set(before.values()) == {".py"}

    make = subprocess.run(
        ["make", "-s", "bytecode", f"BIN={Path(sys.executable).parent}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert make.returncode == 0, make.stderr

    after = _compiled_from(tmp_path)
    assert len(after) == len(before)
    assert set(after.values()) == {".pyc"}
