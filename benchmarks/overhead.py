"""Orchestration overhead of a sweep, against Ray Tune's own, in one process run.

For each size (default 16 and 256 tiny trials, 2 at a time) two arms run back to back,
each with its own local Ray started from nothing and shut down after:

- vramsweep: the grid through the Ray Tune driver (``run_sweep``, which starts Ray) into
  a fresh folder;
- Tune: the peer's best set-up, a plain ``tune.Tuner`` (``reuse_actors=True``, the same
  ``max_concurrent_trials`` and CPUs per trial, the same result files as ours: Tune's
  JSON and CSV loggers without its TensorBoard one) of function trainables that sleep
  exactly the times the vramsweep trials took (a record's ``started_at`` to ``ended_at``),
  on a Ray started as Tune has it (ours starts warm workers: ``orchestrator.warm_workers``,
  which no public setting of Tune offers).

Both have the same ideal, the sum of the trial times / concurrency, and print

    wall / ideal      wall from before ``ray.init`` to the sweep's return
    first trial       from before ``ray.init`` to the first trial's start (the record's
                      ``started_at``; the sleeping trainable's first line)

and the ratios vramsweep / Tune (targets: wall/ideal <= 1.05x, first trial <= 1.2x).
Before the first arm, one unmeasured Tune run of a single trial, so that neither arm pays
the driver's first import of Ray's and Tune's lazily imported modules.
The trials' time to their first training step and their wait for data are medians over
the records; the first trials' own time to their first step (each a warm worker's first
trial: it imports the method's libraries, peft for LoRA) follows. With ``--repeats``,
each arm's medians over the runs and their ratios close the output (``summary``).

    .venv/bin/python benchmarks/overhead.py [--sizes 16 256] [--steps 4] [--repeats 1]
    .venv/bin/python benchmarks/overhead.py --grid GRID      # a grid of one's own
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import ray
import yaml

from orchestrator.expansion import expand
from orchestrator.grid import load_grid
from orchestrator.records import RecordStore
from orchestrator.tune_driver import (
    _result_files,
    _tune_environment,
    connect,
    disconnect,
    run_sweep,
)

TINY: dict = {
    "name": "overhead",
    "output": "unused",
    "budget_mb": 256,  # its RSS limit is reserved as Ray memory: two fit on a busy node
    "seeds": [0],
    "datasets": {"synthetic": {"num_classes": 4, "images_per_class": 16, "image_size": 16}},
    "backbones": {"vit_test": {"img_size": 16}},
    "methods": {"lora": {}},
    "checkpointing": ["none"],
    "train": {"epochs": 1, "batch_size": 16, "max_steps": 4},
    "resources": {"cpus_per_trial": 1, "max_concurrent": 2},
}


@dataclass(frozen=True)
class Arm:
    """One arm's figures: wall time and time to the first trial (both from before
    ``ray.init``), and each trial's own time, seconds."""

    name: str
    wall_s: float
    first_trial_s: float
    span_s: float  # first trial's start to last trial's end
    trial_s: list[float]  # in the order they started
    concurrency: int

    @property
    def ideal_s(self) -> float:
        """The sum of the trial times / the concurrency."""
        return sum(self.trial_s) / self.concurrency


def our_arm(grid_path: str) -> tuple[Arm, pd.DataFrame, int, float]:
    """The grid through ``run_sweep``; the arm, the records, the concurrency and the CPUs
    per trial (the peer runs under the same)."""
    grid = load_grid(grid_path)
    with tempfile.TemporaryDirectory() as out:
        grid = replace(grid, output=out)
        specs = expand(grid)
        store = RecordStore(out)
        start_epoch, t0 = time.time(), time.perf_counter()
        run_sweep(  # starts Ray, as for a user (Ray's start is part of what one waits for)
            specs, store, grid.resources, name=grid.name, energy=grid.energy, show_progress=False
        )
        wall = time.perf_counter() - t0
        disconnect()
        df = store.collect()
    df = df.sort_values("started_at", ignore_index=True)
    started = pd.to_datetime(df["started_at"], utc=True)
    ended = pd.to_datetime(df["ended_at"], utc=True)
    trial_s = (ended - started).dt.total_seconds()
    first = started.min().timestamp() - start_epoch
    span = (ended.max() - started.min()).total_seconds()
    conc = min(grid.resources.max_concurrent, len(specs))
    arm = Arm("vramsweep", wall, first, span, list(trial_s), conc)
    return arm, df, conc, float(grid.resources.cpus_per_trial)


def _sleeper(config: dict) -> None:
    """The peer's trial: its start time, then exactly the time one of ours took (after
    importing ``imports``, for the context arm)."""
    import importlib

    from ray import tune

    for module in config.get("imports", ()):
        importlib.import_module(module)
    start = time.time()
    time.sleep(config["sleep_s"])
    tune.report({"start": start, "end": time.time()})


def tune_arm(
    trial_s: list[float], concurrency: int, cpus: float, imports: tuple[str, ...] = ()
) -> Arm:
    """Plain Ray Tune, reusing actors, trials sleeping ``trial_s`` (importing ``imports``
    before their start)."""
    from ray import tune

    with tempfile.TemporaryDirectory() as out, _tune_environment():
        start_epoch, t0 = time.time(), time.perf_counter()
        connect(warm_workers=False)  # Ray as Tune starts it (ours: orchestrator.warm_workers)
        tuner = tune.Tuner(
            tune.with_resources(_sleeper, {"cpu": cpus}),
            param_space={"sleep_s": tune.grid_search(trial_s), "imports": list(imports)},
            tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=concurrency),
            # the result files ours write (no TensorBoard files, which Tune adds by default)
            run_config=tune.RunConfig(storage_path=out, verbose=0, callbacks=_result_files()),
        )
        results = tuner.fit()
        wall = time.perf_counter() - t0
        disconnect()
    starts = [r.metrics["start"] for r in results]
    span = max(r.metrics["end"] for r in results) - min(starts)
    name = "Tune+imp" if imports else "Tune"
    first = min(starts) - start_epoch
    return Arm(name, wall, first, span, list(trial_s), concurrency)


def warm_up() -> None:
    """One sleeping trial through Ray and Tune, unmeasured: the driver imports what Ray's
    start and Tune's run import lazily the first time, which ever arm would run first."""
    tune_arm([0.0], 1, float(TINY["resources"]["cpus_per_trial"]))


# What a trial imports before its start (``_run_spec``): torch, timm and the trial code.
TRIAL_IMPORTS = ("workers.trial",)


def compare(grid_path: str, context: bool) -> tuple[list[str], tuple[Arm, Arm]]:
    """Both arms on one grid (and, with ``context``, Tune with trials that import what
    ours import before they start); the printed lines and the two arms (vramsweep,
    Tune)."""
    ours, df, conc, cpus = our_arm(grid_path)
    assert not ray.is_initialized()
    peer = tune_arm(ours.trial_s, conc, cpus)
    arms = [ours, peer]
    if context:
        arms.append(tune_arm(ours.trial_s, conc, cpus, TRIAL_IMPORTS))
    ideal = ours.ideal_s
    n = len(ours.trial_s)
    lines = [
        f"{n} trials, {conc} at a time, statuses {df['status'].value_counts().to_dict()}; "
        f"median trial {statistics.median(ours.trial_s):.2f} s, ideal {ideal:.1f} s",
        f"  {'arm':10s} {'wall s':>8s} {'wall/ideal':>10s} {'first trial s':>14s} "
        f"{'trials span s':>14s}",
    ]
    for arm in arms:
        lines.append(
            f"  {arm.name:10s} {arm.wall_s:8.1f} {arm.wall_s / ideal:10.3f} "
            f"{arm.first_trial_s:14.2f} {arm.span_s:14.2f}"
        )
    lines += [
        f"  ratio vramsweep/Tune: wall/ideal {ours.wall_s / peer.wall_s:.3f}x (target <= 1.05), "
        f"first trial {ours.first_trial_s / peer.first_trial_s:.2f}x (target <= 1.2)",
        f"  median time to first training step {df['first_step_s'].median():.3f} s "
        f"(the first {conc} trials, each a worker's first: "
        f"{', '.join(f'{s:.2f}' for s in df['first_step_s'][:conc])} s), "
        f"wait for data {df['data_wait_s'].median():.4f} s",
    ]
    if context:
        lines.append(
            f"  context: Tune+imp's trials import {', '.join(TRIAL_IMPORTS)} before they start, "
            f"as ours do; first trial vramsweep/Tune+imp "
            f"{ours.first_trial_s / arms[2].first_trial_s:.2f}x"
        )
    return lines, (ours, peer)


def tiny_grid(trials: int, steps: int, folder: str) -> str:
    """``TINY`` with ``trials`` seeds and ``steps`` steps, as a grid file in ``folder``."""
    grid = copy.deepcopy(TINY)
    grid["name"] = f"overhead{trials}"
    grid["seeds"] = list(range(trials))
    grid["train"]["max_steps"] = steps
    path = Path(folder) / f"overhead{trials}.yaml"
    path.write_text(yaml.safe_dump(grid))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", help="grid YAML of one's own (instead of --sizes)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 256], help="trials")
    parser.add_argument("--steps", type=int, default=4, help="training steps per trial")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every size")
    args = parser.parse_args()
    print(f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    with tempfile.TemporaryDirectory() as tmp:
        grids = [args.grid] if args.grid else [tiny_grid(n, args.steps, tmp) for n in args.sizes]
        warm_up()
        runs: dict[str, list[tuple[Arm, Arm]]] = {grid: [] for grid in grids}
        for _ in range(args.repeats):
            for i, grid in enumerate(grids):
                lines, arms = compare(grid, context=i == 0)
                runs[grid].append(arms)
                print("\n".join(lines), flush=True)
    if args.repeats > 1:
        for grid, pairs in runs.items():
            print(summary(Path(grid).stem, pairs))


def summary(name: str, pairs: list[tuple[Arm, Arm]]) -> str:
    """Each arm's median over the runs, and their ratios. A single run's ratio compares
    two draws of Ray's start and of the first trial's wait for its worker (each varies
    by a second or more here, whichever arm it is); the ratio of the medians compares
    the typical run of each."""
    ours_wall = statistics.median(o.wall_s / o.ideal_s for o, _ in pairs)
    peer_wall = statistics.median(p.wall_s / p.ideal_s for _, p in pairs)
    ours_first = statistics.median(o.first_trial_s for o, _ in pairs)
    peer_first = statistics.median(p.first_trial_s for _, p in pairs)
    per_run = " ".join(f"{o.wall_s / p.wall_s:.3f}" for o, p in pairs)
    return (
        f"{name}, medians of {len(pairs)} runs: wall/ideal {ours_wall:.3f} / {peer_wall:.3f} "
        f"= {ours_wall / peer_wall:.3f}x (target <= 1.05), first trial {ours_first:.2f} s / "
        f"{peer_first:.2f} s = {ours_first / peer_first:.2f}x (target <= 1.2); "
        f"wall/ideal ratio of each run {per_run}"
    )


if __name__ == "__main__":
    main()
