"""Time to the first trial of the command itself, ``orchestrate run GRID``, with its local
Ray started while the grid's backbones are built (``orchestrator.early_ray``) and with
the grid validated before Ray starts, in one run.

Each repeat runs both, in alternating order, as fresh processes on a fresh output folder
(the tiny grid of ``benchmarks/overhead.py``; Ray's dashboard on, as by default):

    first trial   from before the process starts to the first record's ``started_at``
    wall          from before the process starts to its exit (sweep and report)

and the medians over the repeats, with their ratios (validated first / overlapped).

    .venv/bin/python benchmarks/command_start.py [--trials 16] [--repeats 4]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from benchmarks.overhead import tiny_grid
from orchestrator.records import RecordStore

RUN = "import sys; from orchestrator.cli import main; sys.exit(main(sys.argv[1:]))"
# the same command with the grid validated before Ray starts, as before early_ray
VALIDATED_FIRST = (
    "import sys, orchestrator.early_ray as e; e.checked_for_start = lambda *a: None; "
    "from orchestrator.cli import main; sys.exit(main(sys.argv[1:]))"
)
ARMS = {"overlapped": RUN, "validated first": VALIDATED_FIRST}


def run_command(code: str, trials: int) -> tuple[float, float]:
    """One command on a fresh output: seconds to its first trial, and its wall time."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(tiny_grid(trials, 4, folder))
        grid = yaml.safe_load(path.read_text())
        grid["output"] = str(Path(folder) / "out")
        path.write_text(yaml.safe_dump(grid))
        start = time.time()
        done = subprocess.run(
            [sys.executable, "-c", code, "run", str(path), "--no-progress"],
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.time() - start
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        started = pd.to_datetime(RecordStore(grid["output"]).collect()["started_at"], utc=True)
        return started.min().timestamp() - start, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16, help="trials of the tiny grid")
    parser.add_argument("--repeats", type=int, default=4, help="runs of each arm")
    args = parser.parse_args()
    print(f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {args.trials} trials")
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in ARMS}
    for repeat in range(args.repeats):
        order = list(ARMS) if repeat % 2 == 0 else list(reversed(ARMS))
        for name in order:
            first, wall = run_command(ARMS[name], args.trials)
            figures[name].append((first, wall))
            print(f"  {name:16s} first trial {first:6.2f} s   wall {wall:6.2f} s", flush=True)
    medians = {
        name: (statistics.median(f for f, _ in runs), statistics.median(w for _, w in runs))
        for name, runs in figures.items()
    }
    (first_o, wall_o), (first_v, wall_v) = medians["overlapped"], medians["validated first"]
    print(
        f"medians of {args.repeats}: first trial {first_o:.2f} s overlapped, {first_v:.2f} s "
        f"validated first ({first_v / first_o:.2f}x); wall {wall_o:.2f} s / {wall_v:.2f} s "
        f"({wall_v / wall_o:.2f}x)"
    )


if __name__ == "__main__":
    main()
