"""Pareto analysis on hand-built tables (ties included) and against brute force on random ones."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from orchestrator.pareto import (
    BASE_OBJECTIVES,
    _hypervolume_brute,
    _non_dominated_brute,
    aggregate_seeds,
    dataset_fronts,
    default_reference,
    hypervolume,
    knee_index,
    non_dominated,
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
    ).assign(dataset="digits")
    (front,) = dataset_fronts(df, BASE_OBJECTIVES)
    assert front.table.set_index("trial_id")["pareto"].to_dict() == {
        "a": True,
        "d": True,
        "f": False,
    }
    assert front.unmeasured == 3  # b, c (not ok) and e


def test_missing_objective_column_is_an_error() -> None:
    table = pd.DataFrame({"status": ["ok"], "accuracy": [0.5], "dataset": ["digits"]})
    with pytest.raises(KeyError, match="peak_mem_mb"):
        dataset_fronts(table, BASE_OBJECTIVES)


def _random_table(rng: np.random.Generator, k: int, ties: bool) -> tuple[np.ndarray, list[str]]:
    n = int(rng.integers(1, 120))
    values = rng.integers(0, 6, size=(n, k)) if ties else rng.random((n, k))
    return values.astype(float), [str(s) for s in rng.choice(["max", "min"], size=k)]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_non_dominated_equals_brute_force_on_random_tables(k: int, ties: bool) -> None:
    rng = np.random.default_rng(100 * k + ties)
    for _ in range(150):
        values, senses = _random_table(rng, k, ties)
        expected = _non_dominated_brute(values, senses)
        assert non_dominated(values, senses).tolist() == expected.tolist(), (values, senses)


def test_non_dominated_on_a_large_front() -> None:
    # points on a sphere's octant: none dominates another, in 2-D and 3-D
    rng = np.random.default_rng(0)
    d = np.abs(rng.normal(size=(5000, 3)))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    assert non_dominated(d, ["min"] * 3).all()
    assert non_dominated(
        d[:, :2] / np.linalg.norm(d[:, :2], axis=1, keepdims=True), ["min"] * 2
    ).all()
    # one point better than all others on every objective leaves only itself
    assert non_dominated(np.vstack([d, [-1.0, -1.0, -1.0]]), ["min"] * 3).sum() == 1


def test_non_dominated_rejects_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        non_dominated(np.array([[1.0, np.nan]]), ["max", "min"])


@pytest.mark.parametrize(
    ("values", "senses", "reference", "expected"),
    [
        # acc 0.9 @ 30 MiB and 0.6 @ 10 MiB against (0, 40): [10,30) x 0.6 + [30,40) x 0.9
        ([[0.9, 30], [0.6, 10]], ["max", "min"], [0.0, 40.0], 20 * 0.6 + 10 * 0.9),
        # a dominated point and a duplicate add nothing
        ([[0.9, 30], [0.6, 10], [0.5, 35], [0.6, 10]], ["max", "min"], [0.0, 40.0], 21.0),
        # a point beyond the reference adds nothing
        ([[0.9, 30], [0.95, 50]], ["max", "min"], [0.0, 40.0], 0.9 * 10),
        # two 3-D boxes 3x2x1 and 2x3x3 overlapping in 2x2x1
        ([[1, 2, 3], [2, 1, 1]], ["min"] * 3, [4.0, 4.0, 4.0], 6 + 18 - 4),
        # accuracy, memory, energy: one point is a box
        ([[0.5, 10, 100]], ["max", "min", "min"], [0.0, 20.0, 300.0], 0.5 * 10 * 200),
        # one objective: a segment
        ([[3.0], [5.0]], ["max"], [1.0], 4.0),
        # nothing better than the reference
        ([[5.0, 5.0]], ["min", "min"], [5.0, 10.0], 0.0),
    ],
)
def test_hypervolume_by_hand(
    values: list, senses: list[str], reference: list[float], expected: float
) -> None:
    got = hypervolume(np.array(values, dtype=float), senses, reference)
    assert got == pytest.approx(expected, rel=1e-12)
    assert _hypervolume_brute(np.array(values, dtype=float), senses, reference) == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_hypervolume_equals_brute_force_on_random_tables(k: int, ties: bool) -> None:
    rng = np.random.default_rng(10 * k + ties)
    for _ in range(80):
        values, senses = _random_table(rng, k, ties)
        values = values[:30]  # the grid method is O(n^k) cells times n
        reference = default_reference(values, senses) + rng.normal(scale=0.3, size=k)
        expected = _hypervolume_brute(values, senses, reference)
        assert hypervolume(values, senses, reference) == pytest.approx(
            expected, rel=1e-9, abs=1e-12
        )


def test_default_reference() -> None:
    values = np.array([[0.9, 100.0, 50.0], [0.5, 200.0, 10.0]])
    ref = default_reference(values, ["max", "min", "min"])
    assert ref.tolist() == pytest.approx([0.0, 220.0, 55.0])


def test_knee_is_the_point_farthest_from_the_extremes_line() -> None:
    # minimised, scaled to [0, 1]: (0, 1), (0.2, 0.3), (0.5, 0.2), (1, 0): sums 1, .5, .7, 1
    front = np.array([[0.0, 10.0], [2.0, 3.0], [5.0, 2.0], [10.0, 0.0]])
    assert knee_index(front, ["min", "min"]) == 1
    # the same front as accuracy (max) vs memory (min)
    acc = np.column_stack([1.0 - front[:, 1] / 10, front[:, 0]])
    assert knee_index(acc, ["max", "min"]) == 1
    # no bend with two points: the best on the first objective
    assert knee_index(np.array([[0.7, 5.0], [0.9, 50.0]]), ["max", "min"]) == 1


def _configs_table() -> pd.DataFrame:
    """Two datasets; on `a`, config x has the best single seed but the worse mean."""
    rows = []
    for cfg, dataset, accs, mem, energy in [
        ("x", "a", (0.95, 0.55), 10.0, 5.0),  # mean 0.75
        ("y", "a", (0.80, 0.80), 10.0, 5.0),  # mean 0.80: dominates x after averaging
        ("z", "a", (0.70, 0.60), 4.0, 9.0),  # mean 0.65, less memory
        ("w", "b", (0.99, 0.99), 50.0, 1.0),  # another dataset: not compared with a
    ]:
        for seed, acc in enumerate(accs):
            rows.append(
                {
                    "status": "ok",
                    "backbone": "vit",
                    "method": cfg,
                    "checkpointing": "none",
                    "dataset": dataset,
                    "budget_mb": 2048.0,
                    "seed": seed,
                    "accuracy": acc,
                    "peak_mem_mb": mem + seed,
                    "energy_j": energy,
                    "energy_source": "estimated" if cfg == "z" and seed else "nvml_energy",
                    "energy_exclusive": not (cfg == "y" and seed == 1),
                    "train_time_s": 1.0,
                }
            )
    rows.append({**rows[0], "status": "oom", "seed": 7, "accuracy": None})
    return pd.DataFrame(rows)


def test_aggregate_seeds_mean_std_and_energy_labels() -> None:
    configs = aggregate_seeds(_configs_table()).set_index("method")
    assert configs.loc["x", "accuracy"] == pytest.approx(0.75)
    assert configs.loc["x", "accuracy_std"] == pytest.approx(np.std([0.95, 0.55], ddof=1))
    assert configs.loc["x", "peak_mem_mb"] == pytest.approx(10.5)
    assert (configs.loc["x", "seeds"], configs.loc["x", "trials"]) == (2, 3)  # the oom counts
    assert configs.loc["z", "energy_source"] == "estimated,nvml_energy"
    assert not configs.loc["y", "energy_exclusive"]  # one seed shared its GPU
    assert configs.loc["x", "energy_exclusive"]
    assert configs.loc["x", "config"] == "vit / x / none @ 2048 MiB"


def test_aggregate_seeds_known_flags_per_configuration() -> None:
    """all (exclusive) / any (estimated) over the seeds whose flag is known; None if none."""
    rows = _configs_table()
    ok = rows["status"] == "ok"
    flags = {"w": [None, None], "x": [False, None], "y": [True, False], "z": [None, True]}
    rows["energy_estimated"] = None
    rows["energy_exclusive"] = None
    for method, (first, second) in flags.items():
        mine = rows.index[ok & (rows["method"] == method)]
        rows.loc[mine, "energy_estimated"] = [first, second]
        rows.loc[mine, "energy_exclusive"] = [first, second]
    configs = aggregate_seeds(rows).set_index("method")
    estimated = configs["energy_estimated"].to_dict()
    exclusive = configs["energy_exclusive"].to_dict()
    assert estimated == {"w": None, "x": False, "y": True, "z": True}
    assert exclusive == {"w": None, "x": False, "y": False, "z": True}


def test_fronts_are_per_dataset_and_over_seed_means() -> None:
    records = _configs_table()
    # over single trials, x's lucky seed (0.95) is on the front of dataset a
    (trial_front, _) = dataset_fronts(records, {"accuracy": "max", "peak_mem_mb": "min"})
    assert trial_front.front["method"].tolist().count("x") == 1
    fronts = dataset_fronts(aggregate_seeds(records), {"accuracy": "max", "peak_mem_mb": "min"})
    assert [f.dataset for f in fronts] == ["a", "b"]
    a, b = fronts
    assert a.front["method"].tolist() == ["y", "z"]  # x is dominated by y once averaged
    assert b.front["method"].tolist() == ["w"]
    # the reference point is stored: accuracy 0, 1.1 x the worst mean memory of dataset a
    assert a.reference == pytest.approx({"accuracy": 0.0, "peak_mem_mb": 11.55})
    # y: 0.80 @ 10.5 MiB, z: 0.65 @ 4.5 MiB -> [4.5, 10.5) x 0.65 + [10.5, 11.55) x 0.80
    assert a.hypervolume == pytest.approx(6.0 * 0.65 + 1.05 * 0.80)
    assert a.knee in set(a.front["config"])
    assert a.table["knee"].sum() == 1 and b.knee == b.front["config"].iloc[0]


def test_fronts_take_a_given_reference_and_three_objectives() -> None:
    configs = aggregate_seeds(_configs_table())
    objectives = {"accuracy": "max", "peak_mem_mb": "min", "energy_j": "min"}
    (a, _) = dataset_fronts(configs, objectives, reference={"peak_mem_mb": 20.0, "energy_j": 10.0})
    assert a.reference == {"accuracy": 0.0, "peak_mem_mb": 20.0, "energy_j": 10.0}
    values = a.table[list(objectives)].to_numpy()
    ref = [0.0, 20.0, 10.0]
    assert a.hypervolume == pytest.approx(
        _hypervolume_brute(values, list(objectives.values()), ref)
    )
    assert a.knee is None  # the knee is defined on 2-D fronts


def test_fronts_leave_out_unmeasured_configurations() -> None:
    records = _configs_table()
    records.loc[records["method"] == "z", "energy_j"] = None
    (a, _) = dataset_fronts(aggregate_seeds(records), {"accuracy": "max", "energy_j": "min"})
    assert a.unmeasured == 1 and "z" not in set(a.table["method"])
