"""Pareto analysis: pure functions over record tables (no I/O, no Ray).

A point dominates another when it is at least as good on every objective and
strictly better on one. Identical points do not dominate each other, so ties are all
on the front. Only trials with status ``ok`` and every objective measured are
candidates. Fronts are taken per dataset (accuracies of different datasets are not
comparable) and, in the report, over configurations whose seeds have been averaged
(``aggregate_seeds``), so that one lucky seed does not make a front.

Costs: the non-dominated set is O(n log n) for two objectives (sort, then a running
minimum) and for three (sort on the first, then a sweep that keeps the 2-D staircase
of the other two in a sorted list). Hypervolume is O(n log n) in 2-D (sort and sum)
and 3-D (the same sweep, keeping the staircase's area up to date). The O(n^2)
brute-force methods are kept as references for the tests and the benchmark.

Example:
    >>> import pandas as pd
    >>> df = pd.DataFrame({"status": ["ok"] * 3, "accuracy": [0.9, 0.8, 0.7],
    ...                    "peak_mem_mb": [100.0, 50.0, 60.0], "dataset": ["digits"] * 3})
    >>> dataset_fronts(df, BASE_OBJECTIVES)[0].table["pareto"].tolist()
    [True, True, False]
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# Objective -> "max" or "min": the front the command line prints.
BASE_OBJECTIVES: dict[str, str] = {"accuracy": "max", "peak_mem_mb": "min"}
# The trade-offs the report shows: three 2-D views and the 3-D one.
VIEWS: dict[str, dict[str, str]] = {
    "accuracy_memory": {"accuracy": "max", "peak_mem_mb": "min"},
    "accuracy_energy": {"accuracy": "max", "energy_j": "min"},
    "memory_energy": {"peak_mem_mb": "min", "energy_j": "min"},
    "accuracy_memory_energy": {"accuracy": "max", "peak_mem_mb": "min", "energy_j": "min"},
}
# What names a trial in a table a person reads.
TRIAL_COLUMNS = ("trial_id", "backbone", "method", "checkpointing", "dataset", "seed")
# What names a configuration: a trial without its seed.
CONFIG_COLUMNS = ("kind", "backbone", "method", "baseline", "checkpointing", "dataset", "budget_mb")
# Numeric record columns averaged over seeds (those present; newer records have more).
MEASURES = (
    "accuracy",
    "peak_mem_mb",
    "energy_j",
    "energy_avg_w",
    "train_time_s",
    "params_total",
    "params_trainable",
    "macs",
    "infer_latency_ms_b1",
    "infer_peak_mem_mb_b1",
    "deploy_accuracy",
    "deploy_size_mb",
    "deploy_latency_ms_b1",
    "deploy_peak_mem_mb_b1",
)
# A minimised objective's default reference: this much worse than its worst candidate,
# so that every candidate on the front adds volume.
REFERENCE_MARGIN = 0.1


# ---------------------------------------------------------------- non-dominated sets


def _minimising(values: np.ndarray, senses: Sequence[str]) -> np.ndarray:
    """``values`` as floats with every objective turned into "smaller is better"."""
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] != len(senses):
        raise ValueError(f"values must be n x {len(senses)}, got shape {values.shape}")
    if any(s not in ("max", "min") for s in senses):
        raise ValueError(f"senses must be 'max' or 'min', got {list(senses)}")
    v = values.astype(float) * np.array([-1.0 if s == "max" else 1.0 for s in senses])
    if np.isnan(v).any():
        raise ValueError("values contain NaN: drop unmeasured rows first")
    return v


def non_dominated(values: np.ndarray, senses: Sequence[str]) -> np.ndarray:
    """Boolean mask of the rows of ``values`` (n x k) that no other row dominates.

    O(n log n) for k <= 3; for k >= 4 the O(n^2) pairwise method.
    """
    v = _minimising(values, senses)
    if len(v) == 0:
        return np.zeros(0, dtype=bool)
    if v.shape[1] == 1:
        return v[:, 0] == v[:, 0].min()
    if v.shape[1] == 2:
        return _non_dominated_2d(v)
    if v.shape[1] == 3:
        return _non_dominated_3d(v)
    return _pairwise_non_dominated(v)


def _lexsorted(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row order sorting ``v`` lexicographically, and the mask of rows equal to the previous.

    In that order every row that dominates another comes before it.
    """
    order = np.lexsort(v.T[::-1])
    s = v[order]
    repeat = np.zeros(len(s), dtype=bool)
    repeat[1:] = np.all(s[1:] == s[:-1], axis=1)
    return order, repeat


def _non_dominated_2d(v: np.ndarray) -> np.ndarray:
    """Sort by (first, second); a row is on the front iff its second beats all before it."""
    order, repeat = _lexsorted(v)
    y = v[order, 1]
    best_before = np.empty_like(y)
    best_before[0] = np.inf
    np.minimum.accumulate(y[:-1], out=best_before[1:])
    first = y < best_before
    # a repeated row has the status of the first row of its run
    run_start = np.maximum.accumulate(np.where(repeat, 0, np.arange(len(y))))
    mask = np.empty(len(v), dtype=bool)
    mask[order] = first[run_start]
    return mask


def _non_dominated_3d(v: np.ndarray) -> np.ndarray:
    """Sort by (first, second, third), then sweep with the staircase of the last two.

    The staircase holds the (second, third) pairs of the front so far, second
    ascending and third descending; a row is dominated iff the staircase point with
    the largest second <= its second has a third <= its third.
    """
    order, repeat = _lexsorted(v)
    s = v[order]
    ys, zs = s[:, 1].tolist(), s[:, 2].tolist()
    stair_y: list[float] = []
    stair_z: list[float] = []
    on_front = [False] * len(s)
    for k, (y, z) in enumerate(zip(ys, zs, strict=True)):
        if repeat[k]:
            on_front[k] = on_front[k - 1]
            continue
        i = bisect_left(stair_y, y)
        if (i < len(stair_y) and stair_y[i] == y and stair_z[i] <= z) or (
            i > 0 and stair_z[i - 1] <= z
        ):
            continue
        on_front[k] = True
        j = i
        while j < len(stair_z) and stair_z[j] >= z:
            j += 1
        stair_y[i:j] = [y]
        stair_z[i:j] = [z]
    mask = np.empty(len(v), dtype=bool)
    mask[order] = on_front
    return mask


def _pairwise_non_dominated(v: np.ndarray, chunk: int = 256) -> np.ndarray:
    """O(n^2 k) pairwise comparison of minimising ``v``, a block of rows against all rows.

    Column by column, so every comparison is a contiguous vector operation.
    """
    n = len(v)
    columns = [np.ascontiguousarray(v[:, j]) for j in range(v.shape[1])]
    mask = np.ones(n, dtype=bool)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        no_worse = np.ones((stop - start, n), dtype=bool)
        better = np.zeros((stop - start, n), dtype=bool)
        for col in columns:
            block = col[start:stop, None]
            no_worse &= col[None, :] <= block
            better |= col[None, :] < block
        mask[start:stop] = ~np.any(no_worse & better, axis=1)
    return mask


def _non_dominated_brute(values: np.ndarray, senses: Sequence[str]) -> np.ndarray:
    """Reference for tests and the benchmark: the O(n^2) pairwise method for any k."""
    return _pairwise_non_dominated(_minimising(values, senses))


# ---------------------------------------------------------------- hypervolume


def default_reference(values: np.ndarray, senses: Sequence[str]) -> np.ndarray:
    """The reference point: 0 for a maximised objective (accuracy: no better than nothing);
    ``1 + REFERENCE_MARGIN`` times the worst candidate for a minimised one (costs are >= 0)."""
    v = np.asarray(values, dtype=float)
    worst = v.max(axis=0) if len(v) else np.zeros(len(senses))
    return np.array(
        [
            0.0 if s == "max" else (1.0 + REFERENCE_MARGIN) * w
            for s, w in zip(senses, worst, strict=True)
        ]
    )


def hypervolume(values: np.ndarray, senses: Sequence[str], reference: Sequence[float]) -> float:
    """Volume of objective space that the rows of ``values`` dominate, bounded by ``reference``.

    In the objectives' own units (e.g. accuracy x MiB). Rows need not be non-dominated;
    a row no better than the reference on some objective adds nothing.
    """
    v = _minimising(values, senses)
    r = _minimising(np.asarray(reference, dtype=float)[None, :], senses)[0]
    v = v[np.all(v < r, axis=1)]
    if len(v) == 0:
        return 0.0
    if v.shape[1] == 1:
        return float(r[0] - v[:, 0].min())
    if v.shape[1] == 2:
        return _hypervolume_2d(v, r)
    if v.shape[1] == 3:
        return _hypervolume_3d(v, r)
    raise ValueError(f"hypervolume is implemented for 1 to 3 objectives, got {v.shape[1]}")


def _hypervolume_2d(v: np.ndarray, r: np.ndarray) -> float:
    """Sort by the first objective; sum the strips under the running best of the second."""
    s = v[np.lexsort((v[:, 1], v[:, 0]))]
    best = np.minimum.accumulate(s[:, 1])
    widths = np.diff(np.append(s[:, 0], r[0]))
    return float(np.sum(widths * (r[1] - best)))


def _hypervolume_3d(v: np.ndarray, r: np.ndarray) -> float:
    """Sweep along the first objective, keeping the dominated area of the other two.

    Between consecutive first-objective values the dominated volume is that area times
    the slab's thickness; inserting a point into the staircase adds the area between
    it and the staircase (the points it covers are removed), so each point is inserted
    and removed at most once.
    """
    s = v[np.lexsort(v.T[::-1])]
    xs = s[:, 0].tolist()
    next_x = [*xs[1:], float(r[0])]
    ry, rz = float(r[1]), float(r[2])
    stair_y: list[float] = []
    stair_z: list[float] = []
    area = volume = 0.0
    for x, y, z, x_next in zip(xs, s[:, 1].tolist(), s[:, 2].tolist(), next_x, strict=True):
        i = bisect_left(stair_y, y)
        covered = (i < len(stair_y) and stair_y[i] == y and stair_z[i] <= z) or (
            i > 0 and stair_z[i - 1] <= z
        )
        if not covered:
            left_y, left_z = y, (stair_z[i - 1] if i > 0 else rz)
            j = i
            while j < len(stair_z) and stair_z[j] >= z:
                area += (stair_y[j] - left_y) * (left_z - z)
                left_y, left_z = stair_y[j], stair_z[j]
                j += 1
            area += ((stair_y[j] if j < len(stair_y) else ry) - left_y) * (left_z - z)
            stair_y[i:j] = [y]
            stair_z[i:j] = [z]
        volume += area * (x_next - x)
    return volume


def _hypervolume_brute(
    values: np.ndarray, senses: Sequence[str], reference: Sequence[float]
) -> float:
    """Reference for tests: the grid of every point's coordinates, each cell tested.

    O(n^k) cells times n points: for small tables only.
    """
    v = _minimising(values, senses)
    r = _minimising(np.asarray(reference, dtype=float)[None, :], senses)[0]
    v = v[np.all(v < r, axis=1)]
    if len(v) == 0:
        return 0.0
    edges = [np.unique(np.append(v[:, j], r[j])) for j in range(v.shape[1])]
    lows = np.stack(np.meshgrid(*[e[:-1] for e in edges], indexing="ij"), axis=-1)
    sizes = np.stack(np.meshgrid(*[np.diff(e) for e in edges], indexing="ij"), axis=-1)
    lows, sizes = lows.reshape(-1, v.shape[1]), sizes.reshape(-1, v.shape[1])
    covered = np.zeros(len(lows), dtype=bool)
    for point in v:
        covered |= np.all(point <= lows, axis=1)
    return float(np.sum(np.prod(sizes[covered], axis=1)))


# ---------------------------------------------------------------- knee


def knee_index(values: np.ndarray, senses: Sequence[str]) -> int:
    """Row of a 2-D front farthest from the line through its two extremes, on the ideal side.

    Both objectives are scaled to [0, 1] over the front (0 = best), so the extremes
    are (0, 1) and (1, 0) and the distance to their line is (1 - x - y) / sqrt(2):
    the knee is the row with the least scaled sum, the best-balanced trade-off.
    With one or two rows there is no bend: the best row on the first objective.
    """
    v = _minimising(values, senses)
    if v.shape[1] != 2 or len(v) == 0:
        raise ValueError(f"the knee needs a non-empty 2-D front, got shape {v.shape}")
    if len(v) <= 2:
        return int(np.lexsort((v[:, 1], v[:, 0]))[0])
    span = v.max(axis=0) - v.min(axis=0)
    scaled = (v - v.min(axis=0)) / np.where(span > 0, span, 1.0)
    return int(np.argmin(scaled.sum(axis=1)))


# ---------------------------------------------------------------- tables


def _candidates(df: pd.DataFrame, objectives: Mapping[str, str]) -> pd.Series:
    missing = [c for c in objectives if c not in df.columns]
    if missing:
        raise KeyError(f"objective columns missing from the table: {missing}")
    ok = df["status"].eq("ok") if "status" in df else pd.Series(True, index=df.index)
    return ok & df[list(objectives)].notna().all(axis=1)


def variant_columns(df: pd.DataFrame) -> list[str]:
    """The flat argument columns (``method.r``, ``train.lr``; ``records.read`` adds them)
    whose values differ between the trials of ``df``: they tell configurations apart as
    the ``CONFIG_COLUMNS`` do (a grid axis over the learning rate is two configurations)."""
    return [c for c in df.columns if "." in str(c) and df[c].nunique(dropna=False) > 1]


def config_keys(df: pd.DataFrame) -> list[str]:
    """What names a configuration in ``df``: the ``CONFIG_COLUMNS`` present and the
    ``variant_columns``."""
    return [*(c for c in CONFIG_COLUMNS if c in df), *variant_columns(df)]


def config_label(row: Mapping[str, object], variants: Sequence[str] = ()) -> str:
    """``backbone / method / checkpointing @ budget MiB [r=8, lr=0.001]``; a baseline
    shows its own name; the bracket lists the row's values of the ``variants`` columns."""
    method = row.get("method") or row.get("baseline") or "?"
    label = f"{row.get('backbone', '?')} / {method} / {row.get('checkpointing', '?')}"
    budget = row.get("budget_mb")
    if isinstance(budget, Real) and pd.notna(budget):
        label = f"{label} @ {budget:g} MiB"
    values = [f"{c.rpartition('.')[2]}={_short(row[c])}" for c in variants if pd.notna(row.get(c))]
    return f"{label} [{', '.join(values)}]" if values else label


def _short(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def aggregate_seeds(
    df: pd.DataFrame, extra: Sequence[str] = (), keys: Sequence[str] | None = None
) -> pd.DataFrame:
    """One row per configuration: mean and sample std (``<col>_std``) over its ok seeds.

    Averages the ``MEASURES`` present and the numeric columns named in ``extra``.
    ``seeds`` counts the ok seeds, ``trials`` every trial of the configuration;
    ``energy_source`` joins the seeds' meters, ``energy_exclusive`` is False when any
    seed shared its GPU and ``energy_estimated`` True when any seed's energy is an
    estimate (None: unknown). A single seed has no std (NaN). A configuration is named by
    ``keys`` (default: ``config_keys``).
    """
    keys = list(keys) if keys is not None else config_keys(df)
    variants = [k for k in keys if "." in k]
    measures = [c for c in (*MEASURES, *extra) if c in df]
    ok = df[df["status"] == "ok"] if "status" in df else df
    if ok.empty:
        return pd.DataFrame(columns=[*keys, "config", "seeds", "trials", *measures])
    groups = ok.groupby(keys, dropna=False, sort=True)
    numeric = ok[measures].apply(pd.to_numeric, errors="coerce")
    out = numeric.groupby([ok[k] for k in keys], dropna=False).mean()
    std = numeric.groupby([ok[k] for k in keys], dropna=False).std(ddof=1)
    out = out.join(std.add_suffix("_std"))
    out["seeds"] = groups["seed"].nunique() if "seed" in ok else groups.size()
    out["trials"] = df.groupby(keys, dropna=False).size().reindex(out.index).astype(int)
    codes = groups.ngroup().to_numpy()  # group numbers follow out's sorted index
    if "energy_source" in ok:
        out["energy_source"] = _joined(ok["energy_source"], codes, len(out))
    if "energy_exclusive" in ok:
        out["energy_exclusive"] = _known(ok["energy_exclusive"], codes, len(out), all_=True)
    if "energy_estimated" in ok:
        out["energy_estimated"] = _known(ok["energy_estimated"], codes, len(out), all_=False)
    out = out.reset_index()
    labels = [config_label(r, variants) for r in out[keys].to_dict("records")]
    out.insert(len(keys), "config", labels)
    return out


def _joined(values: pd.Series, codes: np.ndarray, count: int) -> list[str]:
    """Per group number: its distinct non-empty values, sorted, joined by commas (one
    pass over the rows, not a Python function per group: 10^4 configurations)."""
    seen: list[set[str]] = [set() for _ in range(count)]
    for code, value in zip(codes, values.to_numpy(), strict=True):
        if isinstance(value, str) and value:
            seen[code].add(value)
    return [",".join(sorted(s)) for s in seen]


def _known(flags: pd.Series, codes: np.ndarray, count: int, all_: bool) -> list[bool | None]:
    """Per group number: all (``all_``) or any of its known flags; None when none is known."""
    known = flags.notna().to_numpy()
    true = np.zeros(count, int)
    np.add.at(true, codes[known], flags[known].astype(bool).to_numpy())
    seen = np.bincount(codes[known], minlength=count)
    hit = true == seen if all_ else true > 0
    return [None if n == 0 else bool(h) for n, h in zip(seen, hit, strict=True)]


@dataclass(frozen=True)
class Front:
    """The Pareto analysis of one dataset under one set of objectives.

    ``table`` holds every candidate configuration (ok, every objective measured) with
    boolean ``pareto`` and ``knee`` columns and the index of the input table, front
    first (best on the first objective first). ``reference`` is the point the
    hypervolume is measured from, in the objectives' units; ``knee`` is the knee row's
    ``config`` (2-D fronts only).
    """

    dataset: str
    objectives: dict[str, str]
    reference: dict[str, float]
    hypervolume: float
    knee: str | None
    table: pd.DataFrame
    unmeasured: int

    @property
    def front(self) -> pd.DataFrame:
        return self.table[self.table["pareto"]]


def dataset_fronts(
    configs: pd.DataFrame,
    objectives: Mapping[str, str],
    reference: Mapping[str, float] | None = None,
) -> list[Front]:
    """The front, hypervolume, reference point and knee of every dataset in ``configs``.

    ``configs`` is ``aggregate_seeds``'s table (or any table with the objective
    columns and a ``dataset`` column). ``reference`` overrides the default reference
    (``default_reference``) objective by objective. A dataset with no candidate is left out.
    """
    objectives = dict(objectives)
    names, senses = list(objectives), list(objectives.values())
    candidates = _candidates(configs, objectives)
    fronts = []
    for dataset, rows in configs.groupby("dataset", dropna=False, sort=True):
        usable = rows[candidates.loc[rows.index]]
        if usable.empty:
            continue
        values = usable[names].to_numpy(dtype=float)
        ref = default_reference(values, senses)
        for j, name in enumerate(names):
            if reference and name in reference:
                ref[j] = float(reference[name])
        mask = non_dominated(values, senses)
        table = usable.assign(pareto=mask, knee=False)
        knee = None
        if len(names) == 2:
            front_rows = np.flatnonzero(mask)
            k = front_rows[knee_index(values[front_rows], senses)]
            table.iloc[k, table.columns.get_loc("knee")] = True
            knee = str(table["config"].iloc[k]) if "config" in table else str(table.index[k])
        ascending = [s == "min" for s in senses]
        table = table.sort_values(["pareto", *names], ascending=[False, *ascending])
        fronts.append(
            Front(
                dataset=str(dataset),
                objectives=objectives,
                reference=dict(zip(names, ref.tolist(), strict=True)),
                hypervolume=hypervolume(values[mask], senses, ref),
                knee=knee,
                table=table,
                unmeasured=len(rows) - len(usable),
            )
        )
    return fronts


def status_counts(df: pd.DataFrame) -> dict[str, int]:
    """Trials per status, most frequent first."""
    return {str(k): int(v) for k, v in df["status"].value_counts().items()} if len(df) else {}
