"""Orchestration overhead of a sweep: wall time against the trials' own time.

Runs a grid into a fresh temporary folder through the Ray Tune driver (a local Ray
started for it) and prints

    overhead ratio = sweep wall time / ideal,  ideal = sum of trial times / concurrency

where a trial's time is its whole ``run_trial`` (record start to end stamps: data,
model, method, training, evaluation, inference cost). What is left is the
orchestrator's: Ray start, worker processes and their imports, scheduling, records.
Also the time from a trial's start to its first training step (``first_step_s``) and
its wait for data (``data_wait_s``), as medians over the trials.

Default: 16 short trials (vit_test on synthetic data, 16 seeds, 2 at a time).

    .venv/bin/python benchmarks/overhead.py [GRID] [--steps 60]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import yaml

from orchestrator.expansion import expand
from orchestrator.grid import load_grid
from orchestrator.records import RecordStore
from orchestrator.tune_driver import connect, run_sweep

SIXTEEN: dict = {
    "name": "overhead16",
    "output": "unused",
    "budget_mb": 2048,
    "seeds": list(range(16)),
    "datasets": {"synthetic": {"num_classes": 4, "images_per_class": 64, "image_size": 16}},
    "backbones": {"vit_test": {"img_size": 16}},
    "methods": {"lora": {}},
    "checkpointing": ["none"],
    "train": {"epochs": 100, "batch_size": 16, "max_steps": 60},
    "resources": {"cpus_per_trial": 1, "max_concurrent": 2},
}


def measure(grid_path: str) -> None:
    grid = load_grid(grid_path)
    with tempfile.TemporaryDirectory() as out:
        grid = replace(grid, output=out)
        specs = expand(grid)
        store = RecordStore(out)
        t0 = time.perf_counter()
        connect()  # Ray's own start is part of what a user waits for
        t_ray = time.perf_counter() - t0
        run_sweep(
            specs, store, grid.resources, name=grid.name, energy=grid.energy, show_progress=False
        )
        wall = time.perf_counter() - t0
        df = store.collect()
    conc = min(grid.resources.max_concurrent, len(specs))
    trial_s = (pd.to_datetime(df["ended_at"]) - pd.to_datetime(df["started_at"])).dt.total_seconds()
    ideal = trial_s.sum() / conc
    work = (df["train_time_s"].fillna(0) + df["eval_time_s"].fillna(0)).sum() / conc
    print(
        f"grid {grid_path}: {len(specs)} trials, concurrency {conc}, statuses "
        f"{df['status'].value_counts().to_dict()}"
    )
    print(f"sweep wall time (Ray start included)     {wall:8.1f} s")
    print(f"  of which ray.init                      {t_ray:8.1f} s")
    print(f"ideal: sum of trial times / concurrency  {ideal:8.1f} s")
    print(f"overhead ratio (wall / ideal)            {wall / ideal:8.2f}")
    print(f"  without Ray's start                    {(wall - t_ray) / ideal:8.2f}")
    print(f"train+eval only / concurrency            {work:8.1f} s")
    print(f"median trial time                        {trial_s.median():8.2f} s")
    print(f"median time to first training step       {df['first_step_s'].median():8.3f} s")
    print(f"median wait for data                     {df['data_wait_s'].median():8.4f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", nargs="?", help="grid YAML (default: 16 short trials)")
    parser.add_argument("--steps", type=int, default=60, help="steps per trial (default grid)")
    args = parser.parse_args()
    if args.grid:
        measure(args.grid)
        return
    grid = copy.deepcopy(SIXTEEN)
    grid["train"]["max_steps"] = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sixteen.yaml"
        path.write_text(yaml.safe_dump(grid))
        measure(str(path))


if __name__ == "__main__":
    main()
