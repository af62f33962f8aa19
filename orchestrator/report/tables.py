"""The report's tables as data frames of strings, and the lines that say how to read them.

Both pages (Markdown and HTML) lay out these frames; nothing here knows a format beyond
``markdown_table``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import netscore, pareto
from orchestrator.report.analysis import (
    OBJECTIVE_LABELS,
    VIEW_TITLES,
    Analysis,
    axis_title,
)

log = logging.getLogger(__name__)

COMPARED = ("method", "backbone", "checkpointing")
STEADY_STATE_LABELS = (
    ("step_time_s", "mean time per step (s)"),
    ("step_energy_j", "mean energy per step (J)"),
)
TABLE_ROWS = 500  # configurations in a per-configuration table (the best first)
PROBLEMS_LISTED = 200  # failed trials listed one by one; past it they are counted by error
PROBLEM_COLUMNS = (
    "trial_id",
    "status",
    "dataset",
    "backbone",
    "method",
    "checkpointing",
    "seed",
    "budget_mb",
)
# The raw components of every NetScore variant, in the units the scores use: the
# accuracies first, then each size/cost component once (defined in netscore.VARIANTS).
NETSCORE_COMPONENTS = (
    ("top-1 (%)", "accuracy", 0.01),
    ("deployed top-1 (%)", "deploy_accuracy", 0.01),
    *dict.fromkeys(
        (f"{c.label} ({c.unit})", c.column, c.scale)
        for v in netscore.VARIANTS.values()
        for c in (v.size, v.cost)
    ),
)


def num(value: Any, digits: int = 4) -> str:
    """A cell: floats to ``digits`` significant digits, missing values empty."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float | np.floating):
        return f"{value:.{digits}g}"
    return str(value)


def pm(row: Mapping[str, Any], column: str, scale: float = 1.0) -> str:
    """``mean ± std`` of a configuration's column; just the mean for one seed or no spread."""
    mean, std = row.get(column), row.get(f"{column}_std")
    if mean is None or pd.isna(mean):
        return ""
    text = num(float(mean) / scale)
    return text if std is None or pd.isna(std) or std == 0 else f"{text} ± {num(std / scale, 2)}"


def energy_cell(row: Mapping[str, Any], scale: float = 1.0) -> str:
    """Energy ± std with its label (*estimated*, *share*) when it is not a plain measurement."""
    text = pm(row, "energy_j", scale)
    note = row.get("energy_note") or ""
    return f"{text} ({note})" if text and note else text


def front_display(front: pareto.Front) -> pd.DataFrame:
    """The front of one dataset and view as strings: configuration, seeds, objectives."""
    rows = []
    for row in front.front.to_dict("records"):
        out = {"configuration": row["config"], "seeds": row["seeds"]}
        for col in front.objectives:
            out[axis_title(col)] = energy_cell(row) if col == "energy_j" else pm(row, col)
        if len(front.objectives) == 2:
            out["knee"] = "knee" if row["knee"] else ""
        rows.append(out)
    return pd.DataFrame(rows)


def front_summary(front: pareto.Front) -> str:
    """Front size, hypervolume with its unit, the reference point and the knee, in one line."""
    labels = [OBJECTIVE_LABELS.get(c, (c, "")) for c in front.objectives]
    units = " × ".join(unit for _, unit in labels)
    ref = ", ".join(
        f"{label} {num(v)} {unit}".strip()
        for (label, unit), v in zip(labels, front.reference.values(), strict=True)
    )
    text = (
        f"{len(front.front)} of {len(front.table)} configurations on the front; "
        f"hypervolume {num(front.hypervolume)} ({units}) from the reference point ({ref})"
    )
    if front.knee:
        text += f"; knee: {front.knee}"
    if front.unmeasured:
        text += f"; {front.unmeasured} configurations lack a value and are left out"
    return text + "."


def netscore_display(analysis: Analysis) -> pd.DataFrame:
    """Configurations, best first by the first variant, with top-1 and every NetScore."""
    configs = _by_first_score(analysis)
    rows = []
    for row in configs.to_dict("records"):
        out = {"dataset": row["dataset"], "configuration": row["config"], "seeds": row["seeds"]}
        out["top-1 (%)"] = pm(row, "accuracy", 0.01)
        for name in analysis.variants:
            out[name] = pm(row, name)
            if uses_energy(name) and out[name] and row.get("energy_note"):
                out[name] += f" ({row['energy_note']})"
        rows.append(out)
    return pd.DataFrame(rows)


def _has(table: pd.DataFrame, column: str) -> bool:
    return column in table and bool(table[column].notna().any())


def netscore_components(analysis: Analysis) -> pd.DataFrame:
    """The raw components every NetScore is computed from, in the units the scores use."""
    configs = _by_first_score(analysis)
    shown = [(label, col, scale) for label, col, scale in NETSCORE_COMPONENTS if _has(configs, col)]
    rows = []
    for row in configs.to_dict("records"):
        out = {"dataset": row["dataset"], "configuration": row["config"]}
        for label, col, scale in shown:
            out[label] = energy_cell(row, scale) if col == "energy_j" else pm(row, col, scale)
        rows.append(out)
    return pd.DataFrame(rows)


def _by_first_score(analysis: Analysis) -> pd.DataFrame:
    """The best ``TABLE_ROWS`` configurations by the first NetScore variant."""
    if analysis.configs.empty or not analysis.variants:
        return analysis.configs.iloc[:0]
    best = analysis.configs.sort_values(analysis.variants[0], ascending=False, na_position="last")
    return best.head(TABLE_ROWS)


def netscore_note(analysis: Analysis) -> str:
    """What the NetScore tables leave out ('' when nothing)."""
    count = len(analysis.configs)
    if count <= TABLE_ROWS or not analysis.variants:
        return ""
    return (
        f"The best {TABLE_ROWS} of {count} configurations by {analysis.variants[0]}; "
        "`orchestrate collect DIR --out table.csv` has every trial."
    )


def uses_energy(name: str) -> bool:
    """Whether a NetScore variant is computed from the training energy (then labelled like it)."""
    variant = netscore.VARIANTS[name]
    return "energy_j" in (variant.size.column, variant.cost.column)


def comparison(analysis: Analysis, factor: str) -> pd.DataFrame:
    """Per dataset and value of ``factor``: trials by status, accuracy, costs, front members.

    Grouped once per table (not a data frame per row: 400 backbones x 3 datasets)."""
    records, configs = analysis.records, analysis.configs
    on_front = pd.Series(False, index=configs.index)
    for front in analysis.fronts.get("accuracy_memory", {}).values():
        on_front[front.front.index] = True
    statuses: dict[tuple, dict[str, int]] = {}
    for (dataset, value, status), n in (
        records.groupby(["dataset", factor, "status"], dropna=False).size().items()
    ):
        statuses.setdefault((dataset, None if pd.isna(value) else value), {})[status] = int(n)
    stats = _config_stats(configs.assign(on_front=on_front), factor, analysis.variants[:1])
    rows = []
    for (dataset, value), counts in statuses.items():
        row = {
            "dataset": dataset,
            factor: value or "(none)",
            "trials": sum(counts.values()),
            "ok": counts.get("ok", 0),
            "not ok": ", ".join(
                f"{k} {v}"
                for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                if k != "ok"
            ),
            "configurations": 0,
            "on accuracy/memory front": 0,
        }
        row.update(stats.get((dataset, value), {}))
        rows.append(row)
    return pd.DataFrame(rows)


def _config_stats(
    configs: pd.DataFrame, factor: str, variants: list[str]
) -> dict[tuple, dict[str, Any]]:
    """``comparison``'s configuration cells per (dataset, value of ``factor``)."""
    groups = configs.groupby(["dataset", factor], dropna=True)
    cells: dict[str, pd.Series] = {
        "configurations": groups.size(),
        "on accuracy/memory front": groups["on_front"].sum(),
        "best accuracy": groups["accuracy"].max().map(num),
        "mean accuracy": groups["accuracy"].mean().map(num),
        "median peak memory (MiB)": groups["peak_mem_mb"].median().map(num),
    }
    if "energy_j" in configs and "energy_note" in configs:
        notes: dict[tuple, set[str]] = {}
        for key, note in zip(
            zip(configs["dataset"], configs[factor], strict=True),
            configs["energy_note"],
            strict=True,
        ):
            notes.setdefault(key, set()).update(n for n in note.split(", ") if n)
        energy = groups["energy_j"].mean()[groups["energy_j"].count() > 0]
        cells["mean energy (J)"] = pd.Series(
            {k: num(v) + _includes(notes.get(k, set())) for k, v in energy.items()}, dtype=object
        )
    cells["mean train time (s)"] = groups["train_time_s"].mean().map(num)
    for column, label in STEADY_STATE_LABELS:  # set-up left out (analysis.steady_state)
        if column in configs:
            cells[label] = groups[column].mean()[groups[column].count() > 0].map(num)
    for name in variants:
        cells[f"best {name}"] = groups[name].max().map(num)
    out: dict[tuple, dict[str, Any]] = {}
    for label, series in cells.items():
        for key, cell in series.items():
            out.setdefault(key, {})[label] = cell
    return out


def _includes(notes: set[str]) -> str:
    """The energy cell's note: `` (includes estimated and shared)``; '' without notes."""
    return f" (includes {' and '.join(sorted(notes))})" if notes else ""


def problems_display(records: pd.DataFrame, limit: int = PROBLEMS_LISTED) -> pd.DataFrame:
    """Trials that did not finish ok (the first ``limit``), with the last line of their error."""
    bad = problems(records).head(limit)
    cols = [c for c in PROBLEM_COLUMNS if c in bad]
    out = bad[cols].copy()
    out["error"] = [error_line(e) for e in bad.get("error", pd.Series("", index=bad.index))]
    return out.reset_index(drop=True)


def problems(records: pd.DataFrame) -> pd.DataFrame:
    """The records that did not finish ok, by status and trial id."""
    return records[records["status"] != "ok"].sort_values(["status", "trial_id"])


def problem_kinds(records: pd.DataFrame) -> pd.DataFrame:
    """Trials that did not finish ok counted by status and last error line, most first."""
    bad = problems(records)
    errors = bad.get("error", pd.Series("", index=bad.index))
    kinds = pd.DataFrame({"status": bad["status"], "error": [error_line(e) for e in errors]})
    return kinds.value_counts(sort=True).rename("trials").reset_index()


def problems_note(records: pd.DataFrame, limit: int = PROBLEMS_LISTED) -> str:
    """What a listing cut at ``limit`` trials leaves out ('' when nothing)."""
    count = int((records["status"] != "ok").sum())
    if count <= limit:
        return ""
    return (
        f"{count} trials did not finish ok; counted by error above, the first {limit} listed "
        "below (`orchestrate collect DIR --out table.csv` has every one)."
    )


def error_line(error: object, limit: int = 200) -> str:
    """The last non-empty line of an error (a traceback's message), shortened."""
    lines = [ln.strip() for ln in str(error or "").splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def formatted(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with float columns as strings of 4 significant digits."""
    out = df.copy()
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = out[col].map(num)
    return out


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (floats to 4 significant digits)."""
    cells = formatted(df).map(lambda v: num(v).replace("|", "\\|").replace("\n", " "))
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def definitions(analysis: Analysis) -> list[str]:
    """How to read the report: aggregation, reference point, knee, NetScore, energy labels."""
    s = analysis.scores
    lines = [
        "Each configuration (backbone / method / checkpointing @ budget) is the mean over its "
        "ok seeds, ± the sample standard deviation; fronts are taken per dataset over those "
        "means.",
        "Plots: colour = method, marker shape = checkpointing, fill = backbone; the black "
        "staircase is the Pareto front, the red ring its knee; front points are labelled.",
        "Hypervolume reference point (stored with each front): accuracy 0, and "
        f"{1 + pareto.REFERENCE_MARGIN:g} × the worst candidate of each cost, so that every "
        "front point adds volume.",
        "Knee: the front point farthest from the line through the two extremes of the front, "
        "with both objectives scaled to [0, 1] over the front.",
        f"NetScore family: 20·log10(a^{s.alpha:g} / (size^{s.beta:g} · cost^{s.gamma:g})), "
        "a = top-1 in %; " + "; ".join(_variant_text(v) for v in netscore.VARIANTS.values()) + ".",
    ]
    if s.skipped:
        lines.append(
            "Not computed: " + "; ".join(f"{name} ({why})" for name, why in s.skipped.items()) + "."
        )
    lines.append(
        "Steady state: time per step = batch size / throughput and energy per step = "
        "energy / (steps − 1), both over the steps after the first (warm-up, block profiling "
        "and compilation left out for every strategy); train time still includes the first "
        "step. The checkpointing findings give totals and steady state."
    )
    lines += [f"{name}: {why}." for name, why in s.notes.items()]
    lines += [f"{VIEW_TITLES[v]}: not shown, {why}." for v, why in analysis.unavailable.items()]
    ok = analysis.records[analysis.records["status"] == "ok"]
    meters = sorted({str(m) for m in ok.get("mem_source", pd.Series(dtype=str)).dropna() if m})
    if len(meters) > 1:
        lines.append(
            f"Peak memory comes from different meters ({', '.join(meters)}; column mem_source): "
            "compare memory between trials of the same meter."
        )
    notes = set(analysis.configs.get("energy_note", pd.Series(dtype=str)))
    if any("estimated" in n for n in notes):
        lines.append(
            "Energy marked *estimated* comes from a model, not a meter "
            "(energy_source = estimated, energy_estimated = true)."
        )
    if any("share" in n for n in notes):
        lines.append(
            "Energy marked *share* was measured while the trial shared its GPU "
            "(energy_exclusive = false): it is the trial's share of the device's energy."
        )
    return lines


def _variant_text(v: netscore.Variant) -> str:
    return f"{v.name}: size = {v.size.label} ({v.size.unit}), cost = {v.cost.label} ({v.cost.unit})"
