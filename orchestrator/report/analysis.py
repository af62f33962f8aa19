"""Every number the report shows, computed once from the collected records.

Seeds are averaged per configuration (``orchestrator.pareto.aggregate_seeds``), NetScores
computed (``orchestrator.netscore``) and the Pareto front of every view taken per
dataset. Pure functions over tables: no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from pandas.api.types import is_string_dtype

from orchestrator import netscore, pareto

log = logging.getLogger(__name__)

# Objective column -> (what a reader sees, unit).
OBJECTIVE_LABELS: dict[str, tuple[str, str]] = {
    "accuracy": ("top-1 accuracy", "fraction"),
    "peak_mem_mb": ("peak training memory", "MiB"),
    "energy_j": ("training energy", "J"),
    "train_time_s": ("train time", "s"),
    "step_time_s": ("time per step", "s"),
    "step_energy_j": ("energy per step", "J"),
}
VIEW_TITLES: dict[str, str] = {
    "accuracy_memory": "accuracy vs peak memory",
    "accuracy_energy": "accuracy vs energy",
    "memory_energy": "peak memory vs energy",
    "accuracy_memory_energy": "accuracy, peak memory and energy (3-D)",
}
PLOT_VIEWS = ("accuracy_memory", "accuracy_energy", "memory_energy")
# Steady-state cost of one training step, derived per trial (``steady_state``).
STEADY_STATE = ("step_time_s", "step_energy_j")
# The text columns the report shows or groups by; the others (JSON arguments, plans,
# provenance) are left out of its table: every row filter would copy them (issue 22).
TEXT_COLUMNS = (
    "trial_id",
    "kind",
    "backbone",
    "method",
    "baseline",
    "checkpointing",
    "dataset",
    "status",
    "error",
    "mem_source",
    "energy_source",
    "deploy_variant",
)


@dataclass(frozen=True)
class Analysis:
    """Every number the report shows.

    ``configs``: one row per configuration, mean and ``_std`` over ok seeds, NetScore
    columns included. ``fronts[view][dataset]``: the Pareto analysis of that view.
    ``unavailable[view]``: why a view has no front at all.
    """

    records: pd.DataFrame
    configs: pd.DataFrame
    scores: netscore.NetScores
    fronts: dict[str, dict[str, pareto.Front]]
    unavailable: dict[str, str]
    datasets: list[str]

    @property
    def variants(self) -> list[str]:
        return list(self.scores.table.columns)


def analyse(
    records: pd.DataFrame,
    *,
    alpha: float = netscore.ALPHA,
    beta: float = netscore.BETA,
    gamma: float = netscore.GAMMA,
) -> Analysis:
    """NetScores of the ok trials, seeds averaged per configuration, fronts per dataset."""
    records = steady_state(records)
    ok = records[records["status"] == "ok"]
    scores = netscore.netscores(ok, alpha=alpha, beta=beta, gamma=gamma)
    extra = [*scores.table.columns, *STEADY_STATE]
    configs = pareto.aggregate_seeds(records.join(scores.table), extra=extra)
    if not configs.empty:
        configs["energy_note"] = [energy_note(row) for row in configs.to_dict("records")]
    fronts: dict[str, dict[str, pareto.Front]] = {}
    unavailable: dict[str, str] = {}
    for view, objectives in pareto.VIEWS.items():
        missing = [c for c in objectives if c not in configs or configs[c].isna().all()]
        if configs.empty or missing:
            unavailable[view] = (
                "no ok trial" if configs.empty else f"no value of {', '.join(missing)}"
            )
            continue
        fronts[view] = {f.dataset: f for f in pareto.dataset_fronts(configs, objectives)}
    datasets = sorted(str(d) for d in records["dataset"].dropna().unique())
    return Analysis(records, configs, scores, fronts, unavailable, datasets)


def reported_columns(records: pd.DataFrame) -> pd.DataFrame:
    """``records`` with every number and flag, the ``TEXT_COLUMNS`` and the flat argument
    columns (``train.optimizer``: they name configurations); 100,000 records' JSON and
    provenance text would be copied by every filter for nothing."""
    keep = [
        c
        for c in records.columns
        if c in TEXT_COLUMNS or "." in c or not (is_string_dtype(records[c]) or c.endswith("_json"))
    ]
    return records[keep] if len(keep) < records.shape[1] else records


def steady_state(records: pd.DataFrame) -> pd.DataFrame:
    """``records`` with the steady-state cost of one training step: ``step_time_s`` =
    batch size / ``throughput_img_s`` and ``step_energy_j`` = ``energy_j`` / (``steps`` - 1).
    Both cover the steps after the first, as the record measures throughput and energy, so
    one-off set-up (block profiling, compilation, warm-up) is out for every strategy, where
    ``train_time_s`` and the first step still differ. Empty where a record lacks a figure."""
    nan = pd.Series(float("nan"), index=records.index)
    column = "train_batch_size" if "train_batch_size" in records else "train.batch_size"
    batch = _numbers(records, column, nan)
    throughput = _numbers(records, "throughput_img_s", nan)
    steps = _numbers(records, "steps", nan)
    return records.assign(
        step_time_s=(batch / throughput.where(throughput > 0)),
        step_energy_j=_numbers(records, "energy_j", nan) / (steps - 1).where(steps > 1),
    )


def _numbers(records: pd.DataFrame, column: str, missing: pd.Series) -> pd.Series:
    return pd.to_numeric(records[column], errors="coerce") if column in records else missing


def energy_note(row: Mapping[str, Any]) -> str:
    """``estimated`` when a model, not a meter, gave the energy; ``share`` when the GPU was
    shared (the energy is the trial's share of the device's); empty for a measurement."""
    notes = []
    if "estimated" in str(row.get("energy_source") or "") or _flag(row.get("energy_estimated")):
        notes.append("estimated")
    if _flag(row.get("energy_exclusive")) is False:
        notes.append("share")
    return ", ".join(notes)


def _flag(value: Any) -> bool | None:
    return None if value is None or pd.isna(value) else bool(value)


def method_name(row: Mapping[str, Any]) -> str:
    """The method of a fine-tuning configuration, the baseline's name for a baseline."""
    return str(row.get("method") or row.get("baseline") or "?")


def view_axes(view: str) -> tuple[str, str]:
    """(x column, y column): accuracy is always on y, so up is better on every accuracy plot."""
    cols = list(pareto.VIEWS[view])
    return (cols[1], cols[0]) if cols[0] == "accuracy" else (cols[0], cols[1])


def axis_title(column: str) -> str:
    """``label (unit)`` of an objective column."""
    label, unit = OBJECTIVE_LABELS.get(column, (column, ""))
    return f"{label} ({unit})"
