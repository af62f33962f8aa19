"""Command-line papercuts (issue 20): -v before or after the command, a closed output pipe,
log lines above the progress bar, `make clean`, every grid error at once, every report file
listed. Where the behaviour lives in the process (pipes, terminals, make), a real one runs."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import PIPE_CLOSED, _parser, main
from orchestrator.grid_errors import every_error
from orchestrator.records import RecordStore, TrialRecord
from orchestrator.spec import TrialSpec

REPO = Path(__file__).resolve().parents[2]
ORCHESTRATE = str(Path(sys.executable).with_name("orchestrate"))  # the console script


def _write_records(folder: Path) -> None:
    store = RecordStore(folder)
    for seed, (acc, mem) in enumerate([(0.9, 50.0), (0.8, 20.0)]):
        spec = TrialSpec(backbone="vit_test", method="lora", seed=seed)
        store.write(
            TrialRecord(spec=spec, status="ok", accuracy=acc, peak_mem_mb=mem, mem_source="x")
        )


def _orchestrate(*args: str, **kwargs: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [ORCHESTRATE, *args],
        cwd=REPO,
        stdout=kwargs.pop("stdout", subprocess.PIPE),
        stderr=subprocess.PIPE,
        **kwargs,
    )


# ---------------------------------------------------------------- -v anywhere


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["-v", "run", "g.yaml"], True),
        (["run", "-v", "g.yaml"], True),
        (["run", "g.yaml", "--verbose"], True),
        (["--verbose", "report", "d"], True),
        (["collect", "d", "-v"], True),
        (["run", "g.yaml"], False),
        (["schema"], False),
    ],
)
def test_verbose_before_or_after_the_command(argv: list[str], verbose: bool) -> None:
    args = _parser().parse_args(argv)
    assert args.verbose is verbose
    assert args.command == argv[0] if not argv[0].startswith("-") else args.command == argv[1]


def test_verbose_before_a_bare_grid_means_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`orchestrate -v GRID` runs the grid (argparse would exit on an unknown command):
    here a missing file, refused as a grid error before anything is imported or run."""
    missing = tmp_path / "missing.yaml"
    assert main(["-v", str(missing), "--dry-run"]) == 2
    assert capsys.readouterr().err == f"orchestrate: error: {missing}: file: cannot read it " + (
        "(No such file or directory)\n"
    )


# ---------------------------------------------------------------- a closed pipe


@pytest.mark.parametrize("command", ["collect", "schema"])
def test_closed_pipe_ends_quietly(command: str, tmp_path: Path) -> None:
    """The reader of stdout goes away before the command writes (as `| head` does to a
    long table): no traceback, no 'Exception ignored', the status of a SIGPIPE end."""
    _write_records(tmp_path)
    read, write = os.pipe()
    args = [command, str(tmp_path)] if command == "collect" else [command]
    proc = _orchestrate(*args, stdout=write)
    os.close(write)
    os.close(read)  # before the child has printed anything: its first write fails
    _, err = proc.communicate(timeout=120)
    for noise in ("BrokenPipe", "Traceback", "Exception ignored", "orchestrate:"):
        assert noise not in err.decode()
    assert proc.returncode == PIPE_CLOSED


def test_head_reads_the_first_line(tmp_path: Path) -> None:
    """`orchestrate schema | head -n 1` through a shell: the line, and nothing on stderr."""
    cmd = f"{ORCHESTRATE} schema | head -n 1"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], cwd=REPO, capture_output=True, timeout=120
    )
    assert done.stdout.decode().count("\n") == 1 and "|" in done.stdout.decode()
    assert "BrokenPipe" not in done.stderr.decode()
    assert done.returncode in (0, PIPE_CLOSED)  # 0 when the schema fit the pipe's buffer


# ---------------------------------------------------------------- log lines and the bar

BAR_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from tqdm import tqdm
    from orchestrator import cli

    def sweep(args):  # a command with a progress bar that logs while it is drawn
        bar = tqdm(total=2, unit="trial", desc="sweep")
        bar.update(1)
        logging.getLogger("orchestrator.tune_driver").info("abc123 recorded: ok")
        bar.update(1)
        bar.close()
        return 0

    cli.COMMANDS["schema"] = sweep
    sys.exit(cli.main(["schema", "-v"]))
    """
)


def test_log_lines_go_above_the_progress_bar() -> None:
    """On a terminal, a -v log line is a line of its own, not glued to the bar."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    proc = subprocess.Popen(
        [sys.executable, "-c", BAR_SCRIPT], cwd=REPO, stdout=subprocess.DEVNULL, stderr=slave
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal's other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    screen = b"".join(chunks).decode()
    line = next(ln for ln in screen.split("\n") if "abc123 recorded" in ln)
    shown = line.rstrip("\r").split("\r")[-1]  # what the terminal shows on that row
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d [\d:,]+ INFO orchestrator.tune_driver: abc123 recorded: ok", shown
    )
    assert "2/2" in screen.split("abc123 recorded")[1]  # the bar went on below it


# ---------------------------------------------------------------- make clean


def test_make_clean_keeps_results(tmp_path: Path) -> None:
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    made = [".venv/bin", "site/assets", ".pytest_cache/v", ".ruff_cache/0"]
    kept = ["results/smoke/records", "grid", "orchestrator"]
    for folder in made + kept:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "file").write_text("x")
    bytecode = tmp_path / "orchestrator" / "report" / "__pycache__"  # `make bytecode`'s
    bytecode.mkdir(parents=True)
    (bytecode / "html.cpython-311.pyc").write_bytes(b"x")
    done = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    for folder in made:
        assert not (tmp_path / folder.split("/")[0]).exists(), folder
    assert not bytecode.exists() and bytecode.parent.is_dir()
    for folder in kept:
        assert (tmp_path / folder / "file").read_text() == "x", folder


# ---------------------------------------------------------------- every grid error


def test_validate_reports_every_error(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A budget_mb error no longer hides an epochs error (nor the others); nothing written."""
    grid = {
        **tiny_grid,
        "budget_mb": [2048, -5],
        "methods": {"full": {}, "lora": {"r": -8}, "lorax": {}},
        "train": {**tiny_grid["train"], "epochs": -1},
        "colour": "blue",
    }
    path = write_grid(grid)
    for command in ("validate", "run"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 5, err
        assert all(line.startswith(f"orchestrate: error: {path}: ") for line in err)
        fields = [line.split(": ")[3] for line in err]
        assert fields == ["colour", "budget_mb", "methods.lora", "methods", "train"]
        assert "got -5" in err[1] and "got -8" in err[2] and "'lorax'" in err[3]
        assert "epochs must be an integer >= 1, got -1" in err[4]
        assert "Traceback" not in "".join(err)
    assert not Path(grid["output"]).exists()


def test_one_error_is_one_line(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_grid({**tiny_grid, "seeds": [0, "one"]})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"orchestrate: error: {path}: seeds: must be integers >= 0, got 'one'"]


def test_fields_that_refer_to_a_replaced_field_are_named_unchecked(
    tiny_grid: dict[str, Any],
) -> None:
    """The exclusion names a method in error: it is not judged (it would be an error of
    the stand-in) but named; a baseline's place in its list is kept."""
    raw = {
        **tiny_grid,
        "methods": {"full": {}, "nosuch": {}},
        "exclude": [{"method": "nosuch"}],
        "baselines": [
            {"name": "dinov2_knn", "backbone": "vit_small_patch14_dinov2.lvd142m"},
            {"name": "nobaseline"},
        ],
    }
    errors, unchecked = every_error(raw, "g.yaml")
    assert [e.where for e in errors] == ["methods", "baselines[1]"]
    assert "'nobaseline'" in str(errors[1])
    assert unchecked == ["exclude"]


def test_an_error_elsewhere_leaves_the_exclusions_checked(tiny_grid: dict[str, Any]) -> None:
    raw = {**tiny_grid, "colour": "blue", "exclude": [{"method": "lora"}]}  # lora: not run
    errors, unchecked = every_error(raw, "g.yaml")
    assert [e.where for e in errors] == ["colour", "exclude[0]"] and unchecked == []
    assert "method 'lora' is not in the grid" in str(errors[1])


def test_a_valid_grid_has_no_errors(tiny_grid: dict[str, Any]) -> None:
    assert every_error(tiny_grid, "g.yaml") == ([], [])


# ---------------------------------------------------------------- report lists its files


def test_report_lists_every_file_it_wrote(tmp_path: Path) -> None:
    """Run as a user runs it (-v after the command): every new file is listed, netscore.png
    included, and the -v log line shows."""
    _write_records(tmp_path)
    before = set(tmp_path.rglob("*"))
    proc = _orchestrate("report", str(tmp_path), "-v")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    written = {p for p in set(tmp_path.rglob("*")) - before if p.is_file()}
    written = {p for p in written if "records" not in p.relative_to(tmp_path).parts}
    assert {p.name for p in written} >= {"report.html", "report.md", "pareto.png", "netscore.png"}
    block = out.decode().split("\nreport: ", 1)[1].split("\n\n")[0]  # the page, then indented
    listed = {Path(line.strip()) for line in block.splitlines()}
    assert {p.resolve() for p in listed} == {p.resolve() for p in written}
    assert "INFO orchestrator.report: report: 2 trials" in err.decode()
