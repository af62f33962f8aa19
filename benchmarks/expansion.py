"""Grid expansion speed: seconds to expand a validated grid into 10^4 and 10^5 TrialSpecs
(ids included), against scikit-learn's ParameterGrid listing the same product as plain
dicts, and how fast validation refuses a grid of 10^7 trials.

The grid is the tests' tiny one (one dataset and backbone, two methods, a deploy
section) with budgets x seeds as the large axes. ``--before`` also times the ids as
they were computed before the memoised canonical JSON (dataclasses.asdict + json per
spec). The machine is shared: the median of ``--repeats`` runs, and ratios, are the result.

    .venv/bin/python benchmarks/expansion.py [--repeats 3] [--before]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from sklearn.model_selection import ParameterGrid

sys.path.insert(0, str(Path(__file__).parents[1]))

from orchestrator.expansion import expand  # noqa: E402
from orchestrator.grid import Grid, GridError, load_grid, parse_grid  # noqa: E402
from orchestrator.spec import LATER_FIELDS, TrialSpec, canonical_json  # noqa: E402
from tests.conftest import TINY_GRID  # noqa: E402


def grid_of(trials: int, output: str) -> Grid:
    """The tiny grid grown to ``trials`` (2 methods x 10 budgets x trials/20 seeds)."""
    raw = copy.deepcopy(TINY_GRID)
    raw.update(output=output, budget_mb=[1024 + i for i in range(10)], deploy={})
    raw["seeds"] = list(range(trials // 20))
    return parse_grid(raw, max_trials=None)


def median_s(fn: object, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn()`` (CPU time is less sensitive to a busy machine)."""
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()  # type: ignore[operator]
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def id_before(spec: TrialSpec) -> str:
    data = dataclasses.asdict(spec)
    for name in LATER_FIELDS:
        if not data[name]:
            del data[name]
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()[:12]


def refusal_s(folder: str) -> float:
    """Seconds for ``load_grid`` (file read, YAML, count) to refuse 1000 budgets x 10^4
    seeds x 2 methods: 2 x 10^7 trials."""
    raw = copy.deepcopy(TINY_GRID)
    raw.update(output=f"{folder}/out", budget_mb=list(range(1, 1001)), seeds=list(range(10_000)))
    path = Path(folder) / "huge.yaml"
    path.write_text(yaml.safe_dump(raw, default_flow_style=True))
    t0 = time.perf_counter()
    try:
        load_grid(path)
    except GridError as exc:
        assert "over the limit" in str(exc)
        return time.perf_counter() - t0
    raise AssertionError("the grid was not refused")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", action="store_true", help="also time the ids of before")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        refused = statistics.median(refusal_s(folder) for _ in range(args.repeats))  # first
        print(f"validation refuses 20,000,000 trials in {refused:.3f} s", flush=True)
        for trials in (10_000, 100_000):
            grid = grid_of(trials, f"{folder}/out")
            ours, ours_cpu = median_s(lambda grid=grid: expand(grid), args.repeats)
            axes = {
                "dataset": [c.name for c in grid.datasets],
                "backbone": [c.name for c in grid.backbones],
                "method": [c.name for c in grid.methods],
                "checkpointing": [c.name for c in grid.checkpointing],
                "budget_mb": list(grid.budgets_mb),
                "seed": list(grid.seeds),
            }
            sklearn, _ = median_s(lambda axes=axes: list(ParameterGrid(axes)), args.repeats)
            line = (
                f"expand {trials:>7,} trials: {ours:6.3f} s (cpu {ours_cpu:6.3f} s)   "
                f"ParameterGrid {sklearn:6.3f} s   ratio {ours / sklearn:5.1f}x"
            )
            if args.before:
                specs = expand(grid)
                fresh = [dataclasses.replace(s) for s in specs]  # no cached id
                before, _ = median_s(lambda fresh=fresh: [id_before(s) for s in fresh], 1)
                line += f"   ids as before {before:6.2f} s"
            print(line, flush=True)


if __name__ == "__main__":
    main()
