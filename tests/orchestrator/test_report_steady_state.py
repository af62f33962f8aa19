"""Checkpointing compared on steady-state figures (issue 24): time and energy per step
beside the totals, on records whose answers are computed by hand below."""

from __future__ import annotations

import pandas as pd
import pytest

from orchestrator.report import analyse
from orchestrator.report.analysis import steady_state
from orchestrator.report.findings import findings
from orchestrator.report.tables import comparison

BATCH = 32
# checkpointing -> (peak MiB, throughput img/s, steps, energy J, train s), both seeds alike.
# none:     0.1 s/step (32 / 320), 5 J/step (500 / 100 steps after the first), 12 s in all.
# static:   peak -40 %, 0.125 s/step (+25 %), 6.5 J/step (+30 %), 15 s (+25 %).
# adaptive: peak -40 %, 0.1 s/step (+0 %), 5 J/step (+0 %), yet 24 s (+100 %): its first
#           step profiled every block, which the total holds and the steady state does not.
TRIALS = {
    "none": (1000.0, 320.0, 101, 500.0, 12.0),
    "static": (600.0, 256.0, 101, 650.0, 15.0),
    "adaptive": (600.0, 320.0, 101, 500.0, 24.0),
}


def _records(**overrides: object) -> pd.DataFrame:
    rows = []
    for ckpt, (mem, throughput, steps, energy, time) in TRIALS.items():
        for seed in (0, 1):
            rows.append(
                {
                    "trial_id": f"{ckpt}-{seed}",
                    "kind": "finetune",
                    "status": "ok",
                    "error": "",
                    "backbone": "vit_s",
                    "method": "lora",
                    "baseline": "",
                    "checkpointing": ckpt,
                    "dataset": "cifar100",
                    "seed": seed,
                    "budget_mb": 2048.0,
                    "accuracy": 0.9,
                    "peak_mem_mb": mem,
                    "energy_j": energy,
                    "energy_source": "nvml_energy",
                    "energy_exclusive": True,
                    "train_time_s": time,
                    "throughput_img_s": throughput,
                    "steps": steps,
                    "train_batch_size": BATCH,
                    **overrides,
                }
            )
    return pd.DataFrame(rows)


def _statement(records: pd.DataFrame, strategy: str) -> str:
    made, _ = findings(records).topic("checkpointing")
    return next(f.text for f in made if f.text.startswith(f"{strategy} vs none"))


def test_steady_state_per_trial() -> None:
    table = steady_state(_records()).set_index("trial_id")
    assert table.loc["static-0", "step_time_s"] == pytest.approx(32 / 256)
    assert table.loc["static-0", "step_energy_j"] == pytest.approx(650 / 100)
    assert table.loc["none-1", "step_time_s"] == pytest.approx(0.1)
    assert table.loc["none-1", "step_energy_j"] == pytest.approx(5.0)


def test_steady_state_is_empty_without_its_figures() -> None:
    one_step = steady_state(_records(steps=1, throughput_img_s=0.0))
    assert one_step["step_time_s"].isna().all() and one_step["step_energy_j"].isna().all()
    old = steady_state(_records().drop(columns=["throughput_img_s", "steps", "train_batch_size"]))
    assert old["step_time_s"].isna().all() and old["step_energy_j"].isna().all()


def test_strategies_against_none_per_step_and_in_total() -> None:
    records = _records()
    static = _statement(records, "static")
    for part in (
        "peak memory −40 %",
        "energy +30 %",
        "train time +25 %",
        "time per step +25 %",
        "energy per step +30 %",
    ):
        assert part in static, (part, static)
    adaptive = _statement(records, "adaptive")
    assert "train time +100 %" in adaptive  # the total holds the profiling
    assert "time per step +0.0 %" in adaptive and "energy per step +0.0 %" in adaptive


def test_each_pair_line_gives_the_steady_state() -> None:
    made, _ = findings(_records()).topic("checkpointing")
    static = next(f for f in made if f.text.startswith("static vs none"))
    assert len(static.details) == 1
    assert "time per step +25 %" in static.details[0]
    assert "energy per step +30 %" in static.details[0]


def test_records_without_step_figures_give_totals_only() -> None:
    old = _records().drop(columns=["throughput_img_s", "steps"])
    static = _statement(old, "static")
    assert "train time +25 %" in static and "per step" not in static


def test_comparison_table_by_checkpointing_has_the_steady_state() -> None:
    table = comparison(analyse(_records()), "checkpointing").set_index("checkpointing")
    assert float(table.loc["static", "mean time per step (s)"]) == pytest.approx(0.125)
    assert float(table.loc["none", "mean energy per step (J)"]) == pytest.approx(5.0)
    configs = analyse(_records()).configs.set_index("checkpointing")
    assert configs.loc["adaptive", "step_time_s"] == pytest.approx(0.1)
    assert configs.loc["adaptive", "step_time_s_std"] == pytest.approx(0.0)  # seeds alike


def test_comparison_counts_trials_statuses_and_configurations() -> None:
    records = _records()
    failing = records["checkpointing"] == "static"
    records.loc[failing, "status"] = ["oom", "failed"]  # no ok static trial: no configuration
    records.loc[failing, "accuracy"] = None
    extra = records.iloc[[0]].assign(trial_id="none-2", seed=2, status="over_budget")
    table = comparison(analyse(pd.concat([records, extra])), "checkpointing")
    table = table.set_index("checkpointing")
    assert table.loc["none", ["trials", "ok", "not ok"]].tolist() == [3, 2, "over_budget 1"]
    assert table.loc["static", ["trials", "ok", "not ok"]].tolist() == [2, 0, "failed 1, oom 1"]
    assert table.loc["static", "configurations"] == 0
    assert table["configurations"].to_dict() == {"none": 1, "static": 0, "adaptive": 1}
    assert table.loc["adaptive", "best accuracy"] == "0.9"
    assert pd.isna(table.loc["static", "best accuracy"])  # nothing measured: an empty cell
