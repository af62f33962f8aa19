"""Orchestration overhead of a sweep: wall time vs the trials' own work.

Runs a grid (default: grid/smoke.yaml) into a fresh temporary folder through the
Ray Tune driver and prints

    overhead ratio = sweep wall time / (sum of trials' train+eval time / concurrency)

plus where the rest goes: the trials' own set-up inside the worker (dataset, model,
method; from each record's start/end stamps) and what is left for Ray (process start,
imports, scheduling). 1.0 would be a free orchestrator.

    .venv/bin/python benchmarks/overhead.py [GRID]
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace

import pandas as pd

from orchestrator.expansion import expand
from orchestrator.grid import load_grid
from orchestrator.records import RecordStore
from orchestrator.tune_driver import run_sweep


def main(grid_path: str = "grid/smoke.yaml") -> None:
    grid = load_grid(grid_path)
    with tempfile.TemporaryDirectory() as out:
        grid = replace(grid, output=out)
        specs = expand(grid)
        store = RecordStore(out)
        t0 = time.perf_counter()
        run_sweep(specs, store, grid.resources, name=grid.name, show_progress=False)
        wall = time.perf_counter() - t0
        df = store.collect()
    conc = min(grid.resources.max_concurrent, len(specs))
    work = (df["train_time_s"].fillna(0) + df["eval_time_s"].fillna(0)).sum() / conc
    in_worker = (
        pd.to_datetime(df["ended_at"]) - pd.to_datetime(df["started_at"])
    ).dt.total_seconds().sum() / conc
    print(
        f"grid {grid_path}: {len(specs)} trials, concurrency {conc}, statuses "
        f"{df['status'].value_counts().to_dict()}"
    )
    print(f"sweep wall time                      {wall:8.1f} s")
    print(f"trials' train+eval / concurrency     {work:8.1f} s")
    print(f"trials' whole run_trial / concurrency{in_worker:8.1f} s")
    print(f"overhead ratio (wall / train+eval)   {wall / work:8.2f}")
    print(f"  of which in-trial set-up           {(in_worker - work) / work:8.2f}")
    print(f"  of which Ray + worker start-up     {(wall - in_worker) / work:8.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
