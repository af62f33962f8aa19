"""The sweep report: ``report.html``, ``report.md``, ``pareto.png`` and ``netscore.png``.

``analyse`` computes every number once from the collected records (through the pure
functions of ``orchestrator.pareto`` and ``orchestrator.netscore``); the renderers only
lay them out. ``report.html`` is one self-contained file that works offline: the
data as inline JSON, a small inline script that draws the Pareto plots as SVG
(objective pair and dataset chosen on the page, tooltips naming the configuration,
error bars for the spread over seeds), the tables as HTML, and the PNG figures
embedded for readers without JavaScript. Files are written through the record store.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import netscore, pareto
from orchestrator.records import RecordStore

log = logging.getLogger(__name__)

# Objective column -> (what a reader sees, unit).
OBJECTIVE_LABELS: dict[str, tuple[str, str]] = {
    "accuracy": ("top-1 accuracy", "fraction"),
    "peak_mem_mb": ("peak training memory", "MiB"),
    "energy_j": ("training energy", "J"),
}
VIEW_TITLES: dict[str, str] = {
    "accuracy_memory": "accuracy vs peak memory",
    "accuracy_energy": "accuracy vs energy",
    "memory_energy": "peak memory vs energy",
    "accuracy_memory_energy": "accuracy, peak memory and energy (3-D)",
}
PLOT_VIEWS = ("accuracy_memory", "accuracy_energy", "memory_energy")
COMPARED = ("method", "backbone", "checkpointing")
# Colour per method (matplotlib's tab10) and marker per backbone, the same in PNG and HTML.
COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
MARKERS = (("circle", "o"), ("square", "s"), ("triangle", "^"), ("diamond", "D"), ("down", "v"))
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


@dataclass(frozen=True)
class ReportFiles:
    """Paths of the files written: the page, the Pareto figure, the summary, every PNG."""

    html: str
    png: str
    markdown: str
    figures: tuple[str, ...]


@dataclass(frozen=True)
class Section:
    """A section that the caller adds at the top of the report (a search's result)."""

    title: str
    text: str
    table: pd.DataFrame


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
    ok = records[records["status"] == "ok"]
    scores = netscore.netscores(ok, alpha=alpha, beta=beta, gamma=gamma)
    configs = pareto.aggregate_seeds(records.join(scores.table), extra=list(scores.table.columns))
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


# ---------------------------------------------------------------- tables


def _num(value: Any, digits: int = 4) -> str:
    """A cell: floats to ``digits`` significant digits, missing values empty."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float | np.floating):
        return f"{value:.{digits}g}"
    return str(value)


def _pm(row: Mapping[str, Any], column: str, scale: float = 1.0) -> str:
    """``mean ± std`` of a configuration's column; just the mean for one seed or no spread."""
    mean, std = row.get(column), row.get(f"{column}_std")
    if mean is None or pd.isna(mean):
        return ""
    text = _num(float(mean) / scale)
    return text if std is None or pd.isna(std) or std == 0 else f"{text} ± {_num(std / scale, 2)}"


def _unit(column: str) -> str:
    label, unit = OBJECTIVE_LABELS.get(column, (column, ""))
    return f"{label} ({unit})"


def _energy_cell(row: Mapping[str, Any], scale: float = 1.0) -> str:
    text = _pm(row, "energy_j", scale)
    note = row.get("energy_note") or ""
    return f"{text} ({note})" if text and note else text


def front_display(front: pareto.Front) -> pd.DataFrame:
    """The front of one dataset and view as strings: configuration, seeds, objectives."""
    rows = []
    for row in front.front.to_dict("records"):
        out = {"configuration": row["config"], "seeds": row["seeds"]}
        for col in front.objectives:
            out[_unit(col)] = _energy_cell(row) if col == "energy_j" else _pm(row, col)
        if len(front.objectives) == 2:
            out["knee"] = "knee" if row["knee"] else ""
        rows.append(out)
    return pd.DataFrame(rows)


def front_summary(front: pareto.Front) -> str:
    """Front size, hypervolume with its unit, the reference point and the knee, in one line."""
    labels = [OBJECTIVE_LABELS.get(c, (c, "")) for c in front.objectives]
    units = " × ".join(unit for _, unit in labels)
    ref = ", ".join(
        f"{label} {_num(v)} {unit}".strip()
        for (label, unit), v in zip(labels, front.reference.values(), strict=True)
    )
    text = (
        f"{len(front.front)} of {len(front.table)} configurations on the front; "
        f"hypervolume {_num(front.hypervolume)} ({units}) from the reference point ({ref})"
    )
    if front.knee:
        text += f"; knee: {front.knee}"
    if front.unmeasured:
        text += f"; {front.unmeasured} configurations lack a value and are left out"
    return text + "."


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


def netscore_display(analysis: Analysis) -> pd.DataFrame:
    """Configurations with the raw components (score units) and every NetScore computed."""
    configs = analysis.configs
    if configs.empty or not analysis.variants:
        return pd.DataFrame()
    configs = configs.sort_values(analysis.variants[0], ascending=False, na_position="last")
    rows = []
    for row in configs.to_dict("records"):
        out = {"dataset": row["dataset"], "configuration": row["config"], "seeds": row["seeds"]}
        for label, col, scale in NETSCORE_COMPONENTS:
            if col in configs and configs[col].notna().any():
                out[label] = _energy_cell(row, scale) if col == "energy_j" else _pm(row, col, scale)
        for name in analysis.variants:
            out[name] = _pm(row, name)
            if _uses_energy(name) and out[name] and row.get("energy_note"):
                out[name] += f" ({row['energy_note']})"
        rows.append(out)
    return pd.DataFrame(rows)


def _uses_energy(name: str) -> bool:
    """Whether a NetScore variant is computed from the training energy (then labelled like it)."""
    variant = netscore.VARIANTS[name]
    return "energy_j" in (variant.size.column, variant.cost.column)


def comparison(analysis: Analysis, factor: str) -> pd.DataFrame:
    """Per dataset and value of ``factor``: trials by status, accuracy, costs, front members."""
    records, configs = analysis.records, analysis.configs
    on_front = pd.Series(False, index=configs.index)
    for front in analysis.fronts.get("accuracy_memory", {}).values():
        on_front[front.front.index] = True
    rows = []
    for (dataset, value), trials in records.groupby(["dataset", factor], dropna=False):
        counts = trials["status"].value_counts()
        cfg = configs[(configs["dataset"] == dataset) & (configs[factor] == value)]
        row = {
            "dataset": dataset,
            factor: value or "(none)",
            "trials": len(trials),
            "ok": int(counts.get("ok", 0)),
            "not ok": ", ".join(f"{k} {v}" for k, v in counts.items() if k != "ok"),
            "configurations": len(cfg),
            "on accuracy/memory front": int(on_front[cfg.index].sum()),
        }
        if len(cfg):
            row["best accuracy"] = _num(cfg["accuracy"].max())
            row["mean accuracy"] = _num(cfg["accuracy"].mean())
            row["median peak memory (MiB)"] = _num(cfg["peak_mem_mb"].median())
            if "energy_j" in cfg and cfg["energy_j"].notna().any():
                notes = sorted({n for note in cfg["energy_note"] for n in note.split(", ") if n})
                label = f" (includes {' and '.join(notes)})" if notes else ""
                row["mean energy (J)"] = _num(cfg["energy_j"].mean()) + label
            row["mean train time (s)"] = _num(cfg["train_time_s"].mean())
            if analysis.variants:
                row[f"best {analysis.variants[0]}"] = _num(cfg[analysis.variants[0]].max())
        rows.append(row)
    return pd.DataFrame(rows)


def problems_display(records: pd.DataFrame) -> pd.DataFrame:
    """Trials that did not finish ok, with the last line of their error."""
    bad = records[records["status"] != "ok"]
    cols = [c for c in PROBLEM_COLUMNS if c in bad]
    out = bad[cols].copy()
    out["error"] = [_error_line(e) for e in bad.get("error", pd.Series("", index=bad.index))]
    return out.sort_values(["status", "trial_id"]).reset_index(drop=True)


def _error_line(error: object, limit: int = 200) -> str:
    """The last non-empty line of an error (a traceback's message), shortened."""
    lines = [ln.strip() for ln in str(error or "").splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fmt(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = out[col].map(_num)
    return out


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (floats to 4 significant digits)."""
    cells = _fmt(df).map(lambda v: _num(v).replace("|", "\\|").replace("\n", " "))
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


# ---------------------------------------------------------------- figures


def _styles(configs: pd.DataFrame) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """Colour per method and (svg, matplotlib) marker per backbone, by sorted name."""
    methods = sorted({_method(r) for r in configs.to_dict("records")})
    backbones = sorted({str(b) for b in configs.get("backbone", [])})
    colours = {m: COLOURS[i % len(COLOURS)] for i, m in enumerate(methods)}
    markers = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(backbones)}
    return colours, markers


def _method(row: Mapping[str, Any]) -> str:
    return str(row.get("method") or row.get("baseline") or "?")


def _view_axes(view: str) -> tuple[str, str]:
    """(x column, y column): accuracy is always on y, so up is better on every accuracy plot."""
    cols = list(pareto.VIEWS[view])
    return (cols[1], cols[0]) if cols[0] == "accuracy" else (cols[0], cols[1])


def pareto_figure(analysis: Analysis) -> bytes:
    """One panel per dataset and objective pair: configurations with seed spread, front, knee."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    views = [v for v in PLOT_VIEWS if v in analysis.fronts]
    datasets = analysis.datasets or ["(none)"]
    ncols = max(len(views), 1)
    fig, axes = plt.subplots(
        len(datasets), ncols, figsize=(4.8 * ncols, 3.8 * len(datasets) + 0.8), squeeze=False
    )
    colours, markers = _styles(analysis.configs)
    for r, dataset in enumerate(datasets):
        if not views:
            axes[r][0].text(0.5, 0.5, "no ok trial to plot", ha="center", va="center")
            axes[r][0].set_axis_off()
        for c, view in enumerate(views):
            ax = axes[r][c]
            front = analysis.fronts[view].get(dataset)
            ax.set_title(f"{dataset}: {VIEW_TITLES[view]}", fontsize=9)
            if front is None:
                ax.text(0.5, 0.5, "no ok trial with these values", ha="center", va="center")
                ax.set_axis_off()
                continue
            _draw_panel(ax, front, view, colours, markers)
    handles = [
        Line2D([], [], color=col, marker="o", linestyle="", label=m) for m, col in colours.items()
    ]
    handles += [
        Line2D([], [], color="grey", marker=mk[1], linestyle="", label=b)
        for b, mk in markers.items()
    ]
    handles += [
        Line2D([], [], color="black", drawstyle="steps-post", label="Pareto front"),
        Line2D([], [], color="red", marker="o", mfc="none", ms=12, linestyle="", label="knee"),
    ]
    notes = " ".join(analysis.configs.get("energy_note", []))
    if "estimated" in notes:
        handles.append(
            Line2D([], [], color="grey", marker="o", mfc="none", linestyle="", label="energy est.")
        )
    if "share" in notes:
        handles.append(
            Line2D([], [], color="black", marker="x", ms=4, linestyle="", label="energy a share")
        )
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=7)
    fig.tight_layout(rect=(0, 0.6 / (3.8 * len(datasets) + 0.8), 1, 1))
    return _png(fig, plt)


def _draw_panel(
    ax: Any,
    front: pareto.Front,
    view: str,
    colours: Mapping[str, str],
    markers: Mapping[str, tuple[str, str]],
) -> None:
    xcol, ycol = _view_axes(view)
    table = front.table.assign(_method=[_method(r) for r in front.table.to_dict("records")])
    energy = "energy_j" in (xcol, ycol)
    hollow = table["energy_note"].str.contains("estimated") if energy else False
    table = table.assign(_hollow=hollow)
    for (method, backbone, is_hollow), rows in table.groupby(
        ["_method", "backbone", "_hollow"], dropna=False
    ):
        colour = colours[method]
        ax.errorbar(
            rows[xcol],
            rows[ycol],
            xerr=rows.get(f"{xcol}_std", pd.Series(0.0, index=rows.index)).fillna(0.0),
            yerr=rows.get(f"{ycol}_std", pd.Series(0.0, index=rows.index)).fillna(0.0),
            fmt=markers[str(backbone)][1],
            color=colour,
            mfc="none" if is_hollow else colour,
            mec=colour,
            ms=6,
            elinewidth=0.8,
            capsize=2,
            alpha=0.9,
        )
    if energy:
        share = table[table["energy_note"].str.contains("share")]
        ax.scatter(share[xcol], share[ycol], marker="x", s=14, c="black", lw=0.8, zorder=3)
    pts = table[table["pareto"]].sort_values(xcol)
    ax.step(pts[xcol], pts[ycol], where="post", color="black", linewidth=1.1, alpha=0.8)
    knee = table[table["knee"]]
    ax.scatter(knee[xcol], knee[ycol], s=160, fc="none", ec="red", lw=1.4, zorder=3)
    x = table[xcol]
    if x.min() > 0 and x.max() / x.min() > 50:
        ax.set_xscale("log")
    ax.set_xlabel(_unit(xcol), fontsize=8)
    ax.set_ylabel(_unit(ycol), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)


def netscore_figure(analysis: Analysis, top: int = 25) -> bytes:
    """The ``top`` configurations by the first NetScore computed: one row each, one marker
    per variant, seed spread as error bars; energy-based scores say when energy is estimated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants, configs = analysis.variants, analysis.configs
    best = configs.nlargest(top, variants[0]).iloc[::-1] if variants else configs.iloc[:0]
    fig, ax = plt.subplots(figsize=(9.0, 0.24 * max(len(best), 4) + 1.4))
    if best.empty:
        ax.text(0.5, 0.5, "no NetScore computed", ha="center", va="center")
        ax.set_axis_off()
        return _png(fig, plt)
    rows = np.arange(len(best))
    for j, name in enumerate(variants):
        ax.errorbar(
            best[name],
            rows + 0.12 * (j - (len(variants) - 1) / 2),
            xerr=best[f"{name}_std"].fillna(0.0),
            fmt=MARKERS[j % len(MARKERS)][1],
            color=COLOURS[j % len(COLOURS)],
            ms=4.5,
            capsize=2,
            label=netscore.VARIANTS[name].title,
        )
    labels = []
    for r in best.to_dict("records"):
        note = r["energy_note"] if any(_uses_energy(v) for v in variants) else ""
        labels.append(f"{r['dataset']}: {r['config']}" + (f" [energy {note}]" if note else ""))
    ax.set_yticks(rows, labels, fontsize=6.5)
    ax.set_xlabel("NetScore (dB)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    return _png(fig, plt)


def _png(fig: Any, plt: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------- Markdown


def render_markdown(
    analysis: Analysis,
    title: str,
    figures: Mapping[str, bytes],
    sections: Sequence[Section] = (),
) -> str:
    """The report as Markdown: the caller's sections, definitions, fronts per dataset,
    NetScore, comparisons, failures."""
    records = analysis.records
    counts = ", ".join(f"{k}: {v}" for k, v in pareto.status_counts(records).items())
    parts = [f"# {title}", f"{len(records)} trials ({counts})."]
    for section in sections:
        table = markdown_table(section.table) if not section.table.empty else "(none)"
        parts += [f"## {section.title}", section.text, table]
    parts.append("## How to read this")
    parts.append("\n".join(f"- {line}" for line in definitions(analysis)))
    for dataset in analysis.datasets:
        parts.append(f"## Pareto analysis: {dataset}")
        for view in pareto.VIEWS:
            front = analysis.fronts.get(view, {}).get(dataset)
            if front is None:
                continue
            parts += [f"### {VIEW_TITLES[view]}", front_summary(front)]
            parts.append(markdown_table(front_display(front)))
        if not any(dataset in f for f in analysis.fronts.values()):
            parts.append("(no ok trial)")
    parts.append("## NetScore (per configuration, mean ± std over seeds)")
    table = netscore_display(analysis)
    parts.append(markdown_table(table) if not table.empty else "(no NetScore computed)")
    for factor in COMPARED:
        cmp = comparison(analysis, factor)
        parts += [f"## By {factor}", markdown_table(cmp) if not cmp.empty else "(no trial)"]
    problems = problems_display(records)
    parts += [
        "## Trials that did not finish ok",
        markdown_table(problems) if not problems.empty else "(none)",
    ]
    parts += [f"![{name}]({name})" for name in figures]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- HTML


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def plot_data(analysis: Analysis) -> dict[str, Any]:
    """What the page's script draws: points per configuration and each front's summary."""
    colours, markers = _styles(analysis.configs)
    members: dict[Any, dict[str, list[str]]] = {}
    fronts: dict[str, dict[str, Any]] = {d: {} for d in analysis.datasets}
    for view in PLOT_VIEWS:
        for dataset, front in analysis.fronts.get(view, {}).items():
            for idx, row in front.table.iterrows():
                entry = members.setdefault(idx, {"front": [], "knee": []})
                if row["pareto"]:
                    entry["front"].append(view)
                if row["knee"]:
                    entry["knee"].append(view)
            fronts[dataset][view] = {
                "summary": front_summary(front),
                "reference": front.reference,
                "hypervolume": front.hypervolume,
                "knee": front.knee,
            }
    columns = [
        "config",
        "dataset",
        "backbone",
        "checkpointing",
        "seeds",
        "trials",
        "energy_note",
        "energy_source",
        *[c for o in OBJECTIVE_LABELS for c in (o, f"{o}_std")],
    ]
    points = []
    for idx, row in analysis.configs.iterrows():
        point = {c: row.get(c) for c in columns}
        point["method"] = _method(row)
        point["colour"] = colours[point["method"]]
        point["marker"] = markers[str(row["backbone"])][0]
        point.update(members.get(idx, {"front": [], "knee": []}))
        points.append(point)
    views = {}
    for view in PLOT_VIEWS:
        x, y = _view_axes(view)
        views[view] = {
            "title": VIEW_TITLES[view],
            "x": x,
            "y": y,
            "xlabel": _unit(x),
            "ylabel": _unit(y),
            "unavailable": analysis.unavailable.get(view, ""),
        }
    return _json_safe(
        {
            "datasets": analysis.datasets,
            "views": views,
            "fronts": fronts,
            "points": points,
            "legend": {
                "colours": colours,
                "markers": {b: m[0] for b, m in markers.items()},
            },
        }
    )


def _html_table(df: pd.DataFrame, empty: str = "(none)") -> str:
    if df.empty:
        return f"<p>{html.escape(empty)}</p>"
    return _fmt(df).to_html(index=False, border=0, escape=True, na_rep="")


def _problems_html(records: pd.DataFrame) -> str:
    """Failed trials as a table; the whole error text folds out under its last line."""
    bad = records[records["status"] != "ok"].sort_values(["status", "trial_id"])
    if bad.empty:
        return "<p>(none)</p>"
    cols = [c for c in PROBLEM_COLUMNS if c in bad]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [*cols, "error"])
    body = []
    for row in bad.to_dict("records"):
        cells = "".join(f"<td>{html.escape(_num(row[c]))}</td>" for c in cols)
        error = str(row.get("error") or "")
        cells += (
            f"<td class='err'><details><summary>{html.escape(_error_line(error))}</summary>"
            f"<pre>{html.escape(error)}</pre></details></td>"
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(
    analysis: Analysis,
    title: str,
    figures: Mapping[str, bytes],
    sections: Sequence[Section] = (),
) -> str:
    """One self-contained page: the caller's sections, interactive plots, tables, and the
    PNG figures embedded."""
    records = analysis.records
    counts = ", ".join(f"{k}: {v}" for k, v in pareto.status_counts(records).items())
    data = json.dumps(plot_data(analysis), allow_nan=False, separators=(",", ":"))
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1><p>{len(records)} trials ({esc(counts)}).</p>",
        *[f"<h2>{esc(s.title)}</h2><p>{esc(s.text)}</p>{_html_table(s.table)}" for s in sections],
        "<section id='plots'><h2>Pareto plots</h2><div class='controls'>",
        "<label>dataset <select id='dataset'></select></label><span id='views'></span>",
        "<label><input type='checkbox' id='logx'> log x</label></div>",
        "<div id='plot'><p>The interactive plot needs JavaScript; "
        "the same fronts are drawn in the figures at the end.</p></div>",
        "<p id='caption'></p><div id='legend'></div><div id='tooltip' hidden></div></section>",
        "<h2>How to read this</h2><ul>",
        *[f"<li>{esc(line)}</li>" for line in definitions(analysis)],
        "</ul>",
    ]
    for dataset in analysis.datasets:
        parts.append(f"<h2>Pareto analysis: {esc(dataset)}</h2>")
        for view in pareto.VIEWS:
            front = analysis.fronts.get(view, {}).get(dataset)
            if front is not None:
                parts += [f"<h3>{esc(VIEW_TITLES[view])}</h3><p>{esc(front_summary(front))}</p>"]
                parts.append(_html_table(front_display(front)))
    parts += [
        "<h2>NetScore (per configuration, mean ± std over seeds)</h2>",
        _html_table(netscore_display(analysis), "(no NetScore computed)"),
    ]
    for factor in COMPARED:
        parts += [f"<h2>By {esc(factor)}</h2>", _html_table(comparison(analysis, factor))]
    parts += ["<h2>Trials that did not finish ok</h2>", _problems_html(records), "<h2>Figures</h2>"]
    for name, png in figures.items():
        img = base64.b64encode(png).decode("ascii")
        parts.append(f"<p><img alt='{esc(name)}' src='data:image/png;base64,{img}'></p>")
    parts += [
        f"<script type='application/json' id='report-data'>{data}</script>",
        f"<script>{_SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts)


def write_report(
    df: pd.DataFrame,
    store: RecordStore,
    title: str,
    *,
    alpha: float = netscore.ALPHA,
    beta: float = netscore.BETA,
    gamma: float = netscore.GAMMA,
    sections: Sequence[Section] = (),
    folder: str = "",
) -> ReportFiles:
    """Analyse the records and write the report files next to them (in ``folder`` under
    the output, if given); returns their paths. ``sections`` come first (``orchestrate
    search`` puts its result there, in its own folder: a sweep's report stays)."""
    analysis = analyse(df, alpha=alpha, beta=beta, gamma=gamma)
    figures = {"pareto.png": pareto_figure(analysis), "netscore.png": netscore_figure(analysis)}
    prefix = f"{folder.strip('/')}/" if folder else ""
    paths = {name: store.write_bytes(prefix + name, png) for name, png in figures.items()}
    markdown = render_markdown(analysis, title, figures, sections).encode("utf-8")
    page = render_html(analysis, title, figures, sections).encode("utf-8")
    log.info("report: %d trials, %d configurations", len(df), len(analysis.configs))
    return ReportFiles(
        html=store.write_bytes(prefix + "report.html", page),
        png=paths["pareto.png"],
        markdown=store.write_bytes(prefix + "report.md", markdown),
        figures=tuple(paths.values()),
    )


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin:.5em 0 1em;display:block;"
    "overflow-x:auto;max-width:100%}td,th{border:1px solid #ccc;padding:3px 7px;"
    "text-align:right;vertical-align:top;white-space:nowrap}"
    "th{background:#f3f3f3}td.err{text-align:left;white-space:normal;min-width:320px}"
    "pre{white-space:pre-wrap;font-size:11px}.controls{display:flex;gap:1.2em;"
    "flex-wrap:wrap;align-items:center;margin-bottom:.5em}#plot svg{max-width:100%;height:auto;"
    "border:1px solid #ddd;background:#fff}#tooltip{position:fixed;pointer-events:none;"
    "background:#fffff0;border:1px solid #999;padding:4px 8px;font-size:12px;"
    "box-shadow:1px 1px 4px #0003;max-width:420px}#legend{font-size:12px;display:flex;"
    "flex-wrap:wrap;gap:.3em 1.2em}#legend svg{vertical-align:middle}.axis text{font-size:11px}"
    "img{max-width:100%}"
)

# Draws the plot of the chosen dataset and objective pair from the JSON above it.
# State lives in the URL fragment (#dataset=...&view=...&logx=1), so a view can be linked.
_SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var SVG = "http://www.w3.org/2000/svg";
  var W = 760, H = 460, M = {l: 70, r: 20, t: 16, b: 50};
  var state = {dataset: data.datasets[0], view: "accuracy_memory", logx: null};

  function el(tag, attrs, parent, text) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  function fmt(v) { return v === null || v === undefined ? "" : String(+(+v).toPrecision(4)); }
  function pm(p, c) {
    var s = p[c + "_std"];
    return fmt(p[c]) + (s === null || s === undefined ? "" : " \u00b1 " + fmt(s));
  }
  function markerPath(shape, x, y, r) {
    var k = r * 1.25;
    switch (shape) {
      case "square": return "M" + (x - r) + " " + (y - r) + "h" + 2 * r + "v" + 2 * r +
        "h" + -2 * r + "Z";
      case "triangle": return "M" + x + " " + (y - k) + "L" + (x + k) + " " + (y + r) +
        "L" + (x - k) + " " + (y + r) + "Z";
      case "down": return "M" + x + " " + (y + k) + "L" + (x + k) + " " + (y - r) +
        "L" + (x - k) + " " + (y - r) + "Z";
      case "diamond": return "M" + x + " " + (y - k) + "L" + (x + k) + " " + y + "L" + x +
        " " + (y + k) + "L" + (x - k) + " " + y + "Z";
      default: return "M" + (x - r) + " " + y + "a" + r + " " + r + " 0 1 0 " + 2 * r +
        " 0a" + r + " " + r + " 0 1 0 " + -2 * r + " 0Z";
    }
  }
  function ticks(lo, hi, log) {
    var out = [], t;
    if (log) {
      for (var e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
        [1, 2, 5].forEach(function (m) {
          t = m * Math.pow(10, e);
          if (t >= lo && t <= hi) out.push(t);
        });
      }
      return out;
    }
    var raw = (hi - lo) / 6, mag = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / mag;
    var step = (f >= 5 ? 10 : f >= 2 ? 5 : f >= 1.5 ? 2 : 1) * mag;
    for (t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) {
      out.push(+t.toPrecision(12));
    }
    return out;
  }
  function domain(values, log) {
    var lo = Math.min.apply(null, values), hi = Math.max.apply(null, values);
    if (log) { lo = lo / 1.3; hi = hi * 1.3; return [lo, hi]; }
    var pad = (hi - lo) * 0.06 || Math.abs(hi) * 0.1 || 1;
    return [lo - pad, hi + pad];
  }
  function scale(d, r, log) {
    var f = log ? Math.log10 : function (v) { return v; };
    var a = f(d[0]), b = f(d[1]);
    return function (v) { return r[0] + (f(v) - a) / (b - a) * (r[1] - r[0]); };
  }

  function render() {
    Object.keys(data.views).forEach(function (v) {
      var input = document.getElementById("view-" + v);
      input.disabled = !(data.fronts[state.dataset] || {})[v];
      input.parentNode.title = input.disabled ? (data.views[v].unavailable ||
        "no ok trial of " + state.dataset + " has these values") : "";
    });
    var view = data.views[state.view], plot = document.getElementById("plot");
    var front = (data.fronts[state.dataset] || {})[state.view];
    var caption = document.getElementById("caption");
    plot.replaceChildren();
    if (!front) {
      var why = view.unavailable || "no ok trial of this dataset has these values";
      plot.appendChild(document.createTextNode(state.dataset + ", " + view.title + ": " + why));
      caption.textContent = "";
      return;
    }
    var pts = data.points.filter(function (p) {
      return p.dataset === state.dataset && p[view.x] !== null && p[view.y] !== null;
    });
    var xs = [], ys = [];
    pts.forEach(function (p) {
      var sx = p[view.x + "_std"] || 0, sy = p[view.y + "_std"] || 0;
      xs.push(p[view.x] + sx, p[view.x] - sx > 0 ? p[view.x] - sx : p[view.x]);
      ys.push(p[view.y] + sy, p[view.y] - sy);
    });
    var minx = Math.min.apply(null, pts.map(function (p) { return p[view.x]; }));
    var maxx = Math.max.apply(null, pts.map(function (p) { return p[view.x]; }));
    var log = state.logx === null ? (minx > 0 && maxx / minx > 50) : state.logx;
    if (minx <= 0) log = false;
    document.getElementById("logx").checked = log;
    var dx = domain(xs, log), dy = domain(ys, false);
    var X = scale(dx, [M.l, W - M.r], log), Y = scale(dy, [H - M.b, M.t], false);
    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img"});
    el("clipPath", {id: "area"}, el("defs", {}, svg)).appendChild(
      el("rect", {x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b}));
    var axes = el("g", {"class": "axis"}, svg);
    ticks(dx[0], dx[1], log).forEach(function (t) {
      el("line", {x1: X(t), x2: X(t), y1: M.t, y2: H - M.b, stroke: "#eee"}, axes);
      el("text", {x: X(t), y: H - M.b + 16, "text-anchor": "middle"}, axes, fmt(t));
    });
    ticks(dy[0], dy[1], false).forEach(function (t) {
      el("line", {x1: M.l, x2: W - M.r, y1: Y(t), y2: Y(t), stroke: "#eee"}, axes);
      el("text", {x: M.l - 6, y: Y(t) + 4, "text-anchor": "end"}, axes, fmt(t));
    });
    el("rect", {x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b, fill: "none",
      stroke: "#888"}, axes);
    el("text", {x: (M.l + W - M.r) / 2, y: H - 12, "text-anchor": "middle"}, axes, view.xlabel);
    el("text", {x: 16, y: (M.t + H - M.b) / 2, "text-anchor": "middle",
      transform: "rotate(-90 16 " + (M.t + H - M.b) / 2 + ")"}, axes, view.ylabel);

    var fr = pts.filter(function (p) { return p.front.indexOf(state.view) >= 0; })
      .sort(function (a, b) { return a[view.x] - b[view.x]; });
    var layer = el("g", {"clip-path": "url(#area)"}, svg);
    if (fr.length) {
      var rx = front.reference[view.x], ry = front.reference[view.y];
      var d = "M" + X(fr[0][view.x]) + " " + Y(ry), line = "";
      fr.forEach(function (p, i) {
        var seg = (i ? "L" + X(p[view.x]) + " " + Y(fr[i - 1][view.y]) : "") +
          "L" + X(p[view.x]) + " " + Y(p[view.y]);
        d += seg;
        line += i ? seg : "M" + X(p[view.x]) + " " + Y(p[view.y]);
      });
      var last = fr[fr.length - 1][view.y];
      el("path", {d: d + "L" + X(rx) + " " + Y(last) + "L" + X(rx) + " " + Y(ry) + "Z",
        fill: "#0000000d", "class": "dominated"}, layer);
      el("path", {d: line + "L" + X(rx) + " " + Y(last), fill: "none", stroke: "#000",
        "stroke-width": 1.3, "class": "front"}, layer);
    }
    var tip = document.getElementById("tooltip");
    var energyView = view.x === "energy_j" || view.y === "energy_j";
    pts.forEach(function (p) {
      var g = el("g", {"class": "pt"}, layer), x = X(p[view.x]), y = Y(p[view.y]);
      var sx = p[view.x + "_std"], sy = p[view.y + "_std"];
      if (sx) el("path", {d: "M" + X(Math.max(p[view.x] - sx, log ? dx[0] : -Infinity)) + " " +
        y + "H" + X(p[view.x] + sx), stroke: p.colour, "class": "err"}, g);
      if (sy) el("path", {d: "M" + x + " " + Y(p[view.y] - sy) + "V" + Y(p[view.y] + sy),
        stroke: p.colour, "class": "err"}, g);
      var note = p.energy_note || "", share = note.indexOf("share") >= 0;
      var hollow = energyView && note.indexOf("estimated") >= 0;
      var onFront = p.front.indexOf(state.view) >= 0;
      el("path", {d: markerPath(p.marker, x, y, 5.5), fill: hollow ? "#fff" : p.colour,
        stroke: p.colour, "stroke-width": hollow ? 2 : 1.2,
        "stroke-dasharray": energyView && share ? "2 1.5" : "none", "class": "marker"}, g);
      if (onFront) {
        el("path", {d: markerPath(p.marker, x, y, 8), fill: "none", stroke: "#000",
          "stroke-width": 1.2, "class": "onfront"}, g);
      }
      if (p.knee.indexOf(state.view) >= 0) {
        el("circle", {cx: x, cy: y, r: 11, fill: "none", stroke: "#d00", "stroke-width": 1.5,
          "class": "knee"}, g);
      }
      var lines = [p.config, state.dataset + ", " + p.seeds + " ok seed(s) of " + p.trials +
        " trial(s)", "accuracy " + pm(p, "accuracy"), "peak memory " + pm(p, "peak_mem_mb") +
        " MiB"];
      if (p.energy_j !== null) lines.push("energy " + pm(p, "energy_j") + " J (" +
        (p.energy_source || "?") + (note ? ", " + note : "") + ")");
      if (onFront) lines.push("on the Pareto front" +
        (p.knee.indexOf(state.view) >= 0 ? " (knee)" : ""));
      el("title", {}, g, lines.join("\n"));
      g.addEventListener("mousemove", function (ev) {
        tip.replaceChildren.apply(tip, lines.map(function (l) {
          var div = document.createElement("div");
          div.textContent = l;
          return div;
        }));
        tip.hidden = false;
        tip.style.left = ev.clientX + 14 + "px";
        tip.style.top = ev.clientY + 14 + "px";
      });
      g.addEventListener("mouseleave", function () { tip.hidden = true; });
    });
    plot.appendChild(svg);
    caption.textContent = state.dataset + ", " + view.title + ": " + front.summary;
  }

  function legend() {
    var box = document.getElementById("legend");
    function item(label, shape, colour) {
      var span = document.createElement("span"), s = el("svg", {width: 14, height: 14}, span);
      el("path", {d: markerPath(shape, 7, 7, 5), fill: colour, stroke: colour}, s);
      span.appendChild(document.createTextNode(" " + label));
      box.appendChild(span);
    }
    Object.keys(data.legend.colours).forEach(function (m) {
      item(m, "circle", data.legend.colours[m]);
    });
    Object.keys(data.legend.markers).forEach(function (b) {
      item(b, data.legend.markers[b], "#888");
    });
    var note = document.createElement("span");
    note.textContent = "black outline: on the front; red ring: knee; shaded: dominated " +
      "region (hypervolume); hollow: estimated energy; dashed: energy a share of a shared GPU";
    box.appendChild(note);
  }

  function controls() {
    var params = new URLSearchParams(location.hash.slice(1));
    if (data.datasets.indexOf(params.get("dataset")) >= 0) state.dataset = params.get("dataset");
    if (data.views[params.get("view")]) state.view = params.get("view");
    if (params.has("logx")) state.logx = params.get("logx") === "1";
    var select = document.getElementById("dataset");
    data.datasets.forEach(function (d) {
      var o = document.createElement("option");
      o.value = o.textContent = d;
      select.appendChild(o);
    });
    select.value = state.dataset;
    select.addEventListener("change", function () { state.dataset = select.value; update(); });
    var views = document.getElementById("views");
    Object.keys(data.views).forEach(function (v) {
      var label = document.createElement("label"), input = document.createElement("input");
      input.type = "radio";
      input.name = "view";
      input.value = v;
      input.checked = v === state.view;
      input.id = "view-" + v;
      input.addEventListener("change", function () {
        state.view = v;
        state.logx = null;
        update();
      });
      label.appendChild(input);
      label.appendChild(document.createTextNode(" " + data.views[v].title + " "));
      views.appendChild(label);
    });
    document.getElementById("logx").addEventListener("change", function (ev) {
      state.logx = ev.target.checked;
      update();
    });
  }
  function update() {
    var hash = "dataset=" + encodeURIComponent(state.dataset) + "&view=" + state.view +
      (state.logx === null ? "" : "&logx=" + (state.logx ? 1 : 0));
    history.replaceState(null, "", "#" + hash);
    render();
  }

  if (!data.datasets.length) {
    document.getElementById("plot").textContent = "No trial to plot.";
    return;
  }
  controls();
  legend();
  render();
})();
"""
