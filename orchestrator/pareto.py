"""Pareto analysis: pure functions over record tables (no I/O, no Ray).

A trial dominates another when it is at least as good on every objective and
strictly better on one. Trials with identical objective values do not dominate each
other, so ties are all on the front. Only trials with status ``ok`` and every
objective measured are candidates.

Example:
    >>> import pandas as pd
    >>> df = pd.DataFrame({"status": ["ok"] * 3, "accuracy": [0.9, 0.8, 0.7],
    ...                    "peak_mem_mb": [100.0, 50.0, 60.0]})
    >>> pareto_front(df)["pareto"].tolist()
    [True, True, False]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# Objective -> "max" or "min". Energy joins when every candidate has it measured.
BASE_OBJECTIVES: dict[str, str] = {"accuracy": "max", "peak_mem_mb": "min"}
ENERGY_OBJECTIVE: dict[str, str] = {"energy_j": "min"}
# What names a trial in a table a person reads.
TRIAL_COLUMNS = ("trial_id", "backbone", "method", "checkpointing", "dataset", "seed")


def non_dominated(values: np.ndarray, senses: list[str]) -> np.ndarray:
    """Boolean mask of the rows of ``values`` (n x k) that no other row dominates."""
    if values.ndim != 2 or values.shape[1] != len(senses):
        raise ValueError(f"values must be n x {len(senses)}, got shape {values.shape}")
    if any(s not in ("max", "min") for s in senses):
        raise ValueError(f"senses must be 'max' or 'min', got {senses}")
    # Turn every objective into "smaller is better".
    signs = np.array([-1.0 if s == "max" else 1.0 for s in senses])
    v = values.astype(float) * signs
    n = len(v)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        no_worse = np.all(v <= v[i], axis=1)
        better = np.any(v < v[i], axis=1)
        if np.any(no_worse & better):
            mask[i] = False
    return mask


def objectives_for(df: pd.DataFrame) -> dict[str, str]:
    """Accuracy and peak memory; energy too when every ok trial has it measured."""
    objectives = dict(BASE_OBJECTIVES)
    ok = df[df["status"] == "ok"] if "status" in df else df
    if "energy_j" in ok and len(ok) and ok["energy_j"].notna().all():
        objectives.update(ENERGY_OBJECTIVE)
    return objectives


def pareto_front(df: pd.DataFrame, objectives: Mapping[str, str] | None = None) -> pd.DataFrame:
    """``df`` with a boolean ``pareto`` column (False for non-candidates)."""
    objectives = dict(objectives or objectives_for(df))
    missing = [c for c in objectives if c not in df.columns]
    if missing:
        raise KeyError(f"objective columns missing from the table: {missing}")
    out = df.copy()
    out["pareto"] = False
    candidates = out["status"].eq("ok") if "status" in out else pd.Series(True, index=out.index)
    candidates &= out[list(objectives)].notna().all(axis=1)
    if candidates.any():
        values = out.loc[candidates, list(objectives)].to_numpy(dtype=float)
        out.loc[candidates, "pareto"] = non_dominated(values, list(objectives.values()))
    return out


def front_table(df: pd.DataFrame, objectives: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The Pareto-optimal trials, best accuracy first, with the columns a reader needs."""
    marked = pareto_front(df, objectives)
    cols = [
        c
        for c in (
            *TRIAL_COLUMNS,
            "accuracy",
            "peak_mem_mb",
            "energy_j",
            "train_time_s",
            "params_trainable",
        )
        if c in marked.columns
    ]
    front = marked[marked["pareto"]]
    return front.sort_values(["accuracy", "peak_mem_mb"], ascending=[False, True])[
        cols
    ].reset_index(drop=True)


def summary_by_config(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread over seeds of every configuration (ok trials only)."""
    keys = [c for c in ("backbone", "method", "checkpointing", "dataset", "budget_mb") if c in df]
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame(columns=keys)
    agg = ok.groupby(keys, dropna=False).agg(
        seeds=("seed", "nunique"),
        accuracy_mean=("accuracy", "mean"),
        accuracy_std=("accuracy", "std"),
        peak_mem_mb=("peak_mem_mb", "mean"),
        train_time_s=("train_time_s", "mean"),
    )
    return agg.reset_index().sort_values("accuracy_mean", ascending=False, ignore_index=True)


def status_counts(df: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in df["status"].value_counts().items()} if len(df) else {}
