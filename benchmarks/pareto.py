"""Pareto front + hypervolume of 100k synthetic records: the O(n log n) methods vs brute force.

For 2-D (accuracy max, peak memory min) and 3-D (+ energy min) objectives and two
kinds of table:

- ``independent``: the objectives drawn independently (a sweep's typical table: a small
  front, most records dominated);
- ``all-front``: every record on one trade-off surface (the worst case for the sweep
  and the hypervolume: the front is the whole table).

``fast`` is ``pareto.dataset_fronts`` on the records table (candidates, reference point,
front, hypervolume and knee), the median of ``--repeat`` runs. With ``--brute-n`` below
``--n`` the brute-force front is timed on fewer records and its time scaled by the square
of the ratio in the last column. ``brute`` is the O(n^2)
pairwise front plus the grid hypervolume of that front (O(m^k) cells for a front of m;
not feasible for an ``all-front`` table, where only the brute-force front is timed).
Both answers are checked to agree.

    .venv/bin/python benchmarks/pareto.py [--n 100000] [--repeat 5] [--brute-n N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import pareto

OBJECTIVES = {
    2: {"accuracy": "max", "peak_mem_mb": "min"},
    3: {"accuracy": "max", "peak_mem_mb": "min", "energy_j": "min"},
}
# The grid hypervolume has m^k cells: beyond this front size it is not run.
BRUTE_HV_MAX_FRONT = 400


def records(n: int, k: int, kind: str, seed: int = 0) -> pd.DataFrame:
    """``n`` ok records of one dataset with accuracy, peak memory (and energy for k = 3)."""
    rng = np.random.default_rng(seed)
    if kind == "independent":
        u = rng.random((n, k))
    else:  # points on the positive orthant of a unit sphere: no one dominates another
        d = np.abs(rng.normal(size=(n, k)))
        u = d / np.linalg.norm(d, axis=1, keepdims=True)
        u[:, 0] = 1.0 - u[:, 0]  # accuracy rises where the costs rise
    table = pd.DataFrame(
        {
            "status": "ok",
            "dataset": "synthetic",
            "accuracy": u[:, 0],
            "peak_mem_mb": 50 + 2000 * u[:, 1],
        }
    )
    if k == 3:
        table["energy_j"] = 1e3 + 1e5 * u[:, 2]
    return table


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median wall time of ``repeat`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="records per table")
    parser.add_argument("--repeat", type=int, default=5, help="runs of the fast method")
    parser.add_argument(
        "--brute-n", type=int, default=None, help="records for brute force (default: --n)"
    )
    args = parser.parse_args()
    brute_n = args.brute_n or args.n
    print(f"{args.n} records per table; brute force on {brute_n}; fast = median of {args.repeat}")
    print(
        "| objectives | table | front size | fast front+HV (s) | brute front (s) | "
        "brute HV (s) | brute / fast |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for k, objectives in OBJECTIVES.items():
        names, senses = list(objectives), list(objectives.values())
        for kind in ("independent", "all-front"):
            table = records(args.n, k, kind)
            fast_s, fronts = timed(
                lambda t=table, o=objectives: pareto.dataset_fronts(t, o), args.repeat
            )
            (front,) = fronts
            values = table[names].to_numpy()[:brute_n]
            t0 = time.perf_counter()
            mask = pareto._non_dominated_brute(values, senses)
            front_s = time.perf_counter() - t0
            scale = (args.n / brute_n) ** 2  # O(n^2): measured on fewer records, scaled up
            hv_cell, ratio = "not feasible", f"> {front_s * scale / fast_s:.0f}x"
            if brute_n == args.n:
                assert mask.sum() == len(front.front), "fast and brute-force fronts differ"
            if mask.sum() <= BRUTE_HV_MAX_FRONT:
                t0 = time.perf_counter()
                hv = pareto._hypervolume_brute(values[mask], senses, list(front.reference.values()))
                hv_s = time.perf_counter() - t0
                if brute_n == args.n:
                    assert np.isclose(hv, front.hypervolume, rtol=1e-9), (hv, front.hypervolume)
                hv_cell = f"{hv_s:.3f}"
                ratio = f"{(front_s * scale + hv_s) / fast_s:.0f}x"
            print(
                f"| {k}-D | {kind} | {len(front.front)} | {fast_s:.3f} | {front_s:.2f} | "
                f"{hv_cell} | {ratio} |"
            )


if __name__ == "__main__":
    main()
