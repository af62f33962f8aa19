"""NetScore family on hand-computed examples; missing components skipped, not guessed."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from orchestrator.netscore import netscore, netscores


def test_netscore_of_resnet50_by_hand() -> None:
    # a = 76.1 %, p = 25.6 M, m = 4.1 G: 76.1^2 / (sqrt(25.6) sqrt(4.1)) = 5791.21 / 10.2449
    # = 565.27; 20 log10(565.27) = 55.045
    assert netscore(76.1, 25.6, 4.1) == pytest.approx(55.045, abs=1e-3)


@pytest.mark.parametrize(
    ("a", "p", "m", "kwargs", "expected"),
    [
        (100.0, 1.0, 1.0, {}, 80.0),  # 100^2 / 1 = 10^4
        (10.0, 100.0, 0.01, {}, 40.0),  # 100 / (10 * 0.1) = 100
        (50.0, 2.0, 7.0, {"alpha": 1, "beta": 1, "gamma": 0}, 20 * math.log10(25)),
        (50.0, 4.0, 16.0, {"alpha": 1, "beta": 0.5, "gamma": 0.25}, 20 * math.log10(12.5)),
        (100.0, 0.01, 1.0, {"beta": 1.0}, 120.0),  # 10^4 / 0.01 = 10^6
    ],
)
def test_netscore_formula(a: float, p: float, m: float, kwargs: dict, expected: float) -> None:
    assert netscore(a, p, m, **kwargs) == pytest.approx(expected, abs=1e-9)


def test_netscore_is_nan_where_a_needed_value_is_missing_or_not_positive() -> None:
    scores = netscore(np.array([90.0, 90.0, 0.0, 90.0]), np.array([1.0, np.nan, 1.0, -2.0]), 1.0)
    assert scores[0] == pytest.approx(20 * math.log10(8100))
    assert np.isnan(scores[1:]).all()
    # an exponent of 0 needs no value in its slot
    assert netscore(90.0, np.nan, 1.0, beta=0) == pytest.approx(20 * math.log10(8100))


def _record(**columns: float) -> pd.DataFrame:
    return pd.DataFrame({k: [v] for k, v in columns.items()})


@pytest.mark.parametrize(
    ("variant", "columns", "expected"),
    [
        # accuracy 0.8 -> 80 %; 4e6 params -> 4 M; 9e9 MACs -> 9 G: 6400 / (2 * 3)
        ("netscore", {"accuracy": 0.8, "params_total": 4e6, "macs": 9e9}, 6400 / 6),
        # 4096 MiB -> 4 GiB; 1e9 MACs -> 1 G: 2500 / (2 * 1)
        ("netscore_mem", {"accuracy": 0.5, "peak_mem_mb": 4096.0, "macs": 1e9}, 1250.0),
        # 25000 J -> 25 kJ: 6400 / (2 * 5)
        ("netscore_energy", {"accuracy": 0.8, "params_total": 4e6, "energy_j": 25e3}, 640.0),
        # 100 ms: 10^4 / (1 * 10)
        (
            "netscore_latency",
            {"accuracy": 1.0, "params_total": 1e6, "infer_latency_ms_b1": 100.0},
            1000.0,
        ),
        # 256 MiB -> 0.25 GiB; 4e9 MACs -> 4 G: 10^4 / (0.5 * 2)
        (
            "netscore_infer_mem",
            {"accuracy": 1.0, "infer_peak_mem_mb_b1": 256.0, "macs": 4e9},
            1e4,
        ),
    ],
)
def test_variants_on_hand_computed_records(
    variant: str, columns: dict[str, float], expected: float
) -> None:
    result = netscores(_record(**columns), [variant])
    assert result.table[variant].iloc[0] == pytest.approx(20 * math.log10(expected), abs=1e-9)
    assert not result.skipped and not result.notes


def test_exponents_reach_every_variant() -> None:
    df = _record(accuracy=0.5, params_total=2e6, macs=3e9)
    result = netscores(df, ["netscore"], alpha=1, beta=1, gamma=0)
    assert result.table["netscore"].iloc[0] == pytest.approx(20 * math.log10(50 / 2))
    assert (result.alpha, result.beta, result.gamma) == (1, 1, 0)


def test_a_variant_whose_column_is_missing_is_skipped_with_a_note() -> None:
    # an old record: no inference columns, energy unavailable
    df = pd.DataFrame(
        {
            "accuracy": [0.9, 0.8],
            "params_total": [1e6, 2e6],
            "macs": [1e9, None],
            "peak_mem_mb": [512.0, 1024.0],
            "energy_j": [None, None],
        }
    )
    result = netscores(df)
    assert list(result.table.columns) == ["netscore", "netscore_mem"]
    assert set(result.skipped) == {"netscore_energy", "netscore_latency", "netscore_infer_mem"}
    assert "energy_j" in result.skipped["netscore_energy"]
    assert "infer_latency_ms_b1" in result.skipped["netscore_latency"]
    # the second row has no MACs: no score, and a note says how many rows lack one
    assert np.isnan(result.table["netscore"].iloc[1])
    assert result.notes["netscore"].startswith("1 of 2 rows")


def test_unknown_variant_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="netscore_mem"):
        netscores(_record(accuracy=0.5), ["nsm"])


def test_deploy_variants_score_the_deployed_model() -> None:
    # deployed accuracy 0.5 -> 50 %; 4 MiB on disk; 25 ms: 2500 / (2 * 5). The trained
    # model's accuracy (0.9) does not enter.
    df = _record(
        accuracy=0.9,
        deploy_accuracy=0.5,
        deploy_size_mb=4.0,
        deploy_latency_ms_b1=25.0,
        deploy_peak_mem_mb_b1=256.0,
        macs=4e9,
    )
    result = netscores(df)
    assert result.table["netscore_deploy_latency"].iloc[0] == pytest.approx(20 * math.log10(250))
    # 0.25 GiB, 4 GMAC: 2500 / (0.5 * 2)
    assert result.table["netscore_deploy_mem"].iloc[0] == pytest.approx(20 * math.log10(2500))


def test_deploy_variants_join_the_default_set_only_with_a_deployment_phase() -> None:
    plain = _record(accuracy=0.9, params_total=1e6, macs=1e9)
    assert not any("deploy" in name for name in netscores(plain).table.columns)
    assert not any("deploy" in name for name in netscores(plain).skipped)
    asked = netscores(plain, ["netscore_deploy_latency"])
    assert asked.skipped == {
        "netscore_deploy_latency": "no deploy_accuracy, deploy_size_mb, deploy_latency_ms_b1"
    }
