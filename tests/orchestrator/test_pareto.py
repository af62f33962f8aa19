"""Pareto analysis on hand-built tables, ties included."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from orchestrator.pareto import (
    front_table,
    non_dominated,
    objectives_for,
    pareto_front,
    summary_by_config,
)


def _table(rows: list[tuple]) -> pd.DataFrame:
    """rows: (trial_id, status, accuracy, peak_mem_mb[, energy_j])."""
    cols = ["trial_id", "status", "accuracy", "peak_mem_mb", "energy_j"]
    padded = [r + (None,) * (5 - len(r)) for r in rows]
    return pd.DataFrame(padded, columns=cols).astype({"energy_j": float})


@pytest.mark.parametrize(
    ("values", "senses", "expected"),
    [
        # a chain: each point dominates the next
        ([[0.9, 10], [0.8, 20], [0.7, 30]], ["max", "min"], [True, False, False]),
        # a trade-off: nobody dominates
        ([[0.9, 30], [0.8, 20], [0.7, 10]], ["max", "min"], [True, True, True]),
        # exact ties are both non-dominated
        ([[0.9, 10], [0.9, 10], [0.5, 50]], ["max", "min"], [True, True, False]),
        # equal on one objective, strictly worse on the other: dominated
        ([[0.9, 10], [0.9, 11]], ["max", "min"], [True, False]),
        # three objectives: the third rescues an otherwise dominated point
        (
            [[0.9, 10, 5.0], [0.8, 20, 1.0], [0.8, 20, 6.0]],
            ["max", "min", "min"],
            [True, True, False],
        ),
        # a single point is the front
        ([[0.1, 999]], ["max", "min"], [True]),
        # both minimised
        ([[1, 1], [2, 0], [2, 2]], ["min", "min"], [True, True, False]),
    ],
)
def test_non_dominated(values: list, senses: list[str], expected: list[bool]) -> None:
    assert non_dominated(np.array(values, dtype=float), senses).tolist() == expected


def test_non_dominated_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="senses"):
        non_dominated(np.zeros((2, 2)), ["max", "up"])
    with pytest.raises(ValueError, match="n x 3"):
        non_dominated(np.zeros((2, 2)), ["max", "min", "min"])


def test_front_ignores_failed_and_unmeasured_trials() -> None:
    df = _table(
        [
            ("a", "ok", 0.80, 100.0),
            ("b", "failed", None, None),
            ("c", "over_budget", 0.99, 1.0),  # would dominate everything if it counted
            ("d", "ok", 0.70, 50.0),
            ("e", "ok", None, 10.0),  # no accuracy: not a candidate
            ("f", "ok", 0.60, 60.0),  # dominated by d
        ]
    )
    marked = pareto_front(df)
    assert marked.set_index("trial_id")["pareto"].to_dict() == {
        "a": True,
        "b": False,
        "c": False,
        "d": True,
        "e": False,
        "f": False,
    }


def test_energy_joins_only_when_every_ok_trial_has_it() -> None:
    partial = _table([("a", "ok", 0.8, 10.0, 5.0), ("b", "ok", 0.7, 20.0, None)])
    assert "energy_j" not in objectives_for(partial)
    full = _table([("a", "ok", 0.8, 10.0, 5.0), ("b", "ok", 0.8, 10.0, 1.0)])
    assert objectives_for(full) == {"accuracy": "max", "peak_mem_mb": "min", "energy_j": "min"}
    # with energy, b (less energy, otherwise equal) dominates a
    assert pareto_front(full)["pareto"].tolist() == [False, True]


def test_front_table_orders_by_accuracy_and_keeps_ties() -> None:
    df = _table(
        [
            ("a", "ok", 0.7, 10.0),
            ("b", "ok", 0.9, 40.0),
            ("c", "ok", 0.9, 40.0),
            ("d", "ok", 0.5, 50.0),
        ]
    )
    front = front_table(df)
    assert front["trial_id"].tolist() in (["b", "c", "a"], ["c", "b", "a"])


def test_missing_objective_column_is_an_error() -> None:
    with pytest.raises(KeyError, match="peak_mem_mb"):
        pareto_front(pd.DataFrame({"status": ["ok"], "accuracy": [0.5]}))


def test_summary_aggregates_seeds() -> None:
    df = pd.DataFrame(
        {
            "status": ["ok", "ok", "ok", "failed"],
            "backbone": ["v", "v", "t", "t"],
            "method": ["lora"] * 4,
            "checkpointing": ["none"] * 4,
            "dataset": ["digits"] * 4,
            "budget_mb": [2048.0] * 4,
            "seed": [0, 1, 0, 1],
            "accuracy": [0.8, 0.6, 0.9, None],
            "peak_mem_mb": [10.0, 10.0, 5.0, None],
            "train_time_s": [1.0, 3.0, 2.0, None],
        }
    )
    summary = summary_by_config(df).set_index("backbone")
    assert summary.loc["v", "seeds"] == 2
    assert summary.loc["v", "accuracy_mean"] == pytest.approx(0.7)
    assert summary.loc["v", "accuracy_std"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert summary.loc["t", "seeds"] == 1  # the failed seed is not averaged in
    assert summary.index.tolist() == ["t", "v"]  # best mean accuracy first
