"""The page's interactive plots as Plotly figure specifications (plain dicts, drawn by
plotly.js in the browser): per dataset, the three 2-D Pareto views, the 3-D front, a
parallel-coordinates view of every configuration, and the NetScore variants as small
multiples, one axis each.

The 2-D and 3-D views have one trace per method (colour), a per-point symbol (shape =
checkpointing, fill = backbone), seed spread as error bars, hover text naming the
configuration, and legend-only key traces for the shapes and fills whose clicks the
page's script turns into filters (``meta.filter``). Front points carry direct labels.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import netscore, pareto
from orchestrator.report import encoding as enc
from orchestrator.report.analysis import (
    PLOT_VIEWS,
    VIEW_TITLES,
    Analysis,
    axis_title,
    method_name,
    view_axes,
)
from orchestrator.report.figures import drawn, labelled, sample_note, short_label
from orchestrator.report.tables import front_summary, pm, uses_energy

log = logging.getLogger(__name__)

HEIGHT_2D = 560
HEIGHT_3D = 640
NETSCORE_ROWS = 30  # configurations per NetScore plot, best first
# Points of a 2-D view from which it is drawn with WebGL (scattergl): SVG slows past ~10^3.
WEBGL_FROM = 1000
LEGEND = {"groupclick": "toggleitem", "tracegroupgap": 14, "font": {"size": 12}}
MARGIN = {"l": 70, "r": 20, "t": 30, "b": 60}


@dataclass(frozen=True)
class Plot:
    """One figure of the page: where it goes and what it says."""

    id: str
    dataset: str
    title: str
    caption: str
    figure: dict[str, Any]


def plots(analysis: Analysis) -> list[Plot]:
    """Every interactive figure, dataset by dataset."""
    style = enc.of_configs(analysis.configs)
    return [
        plot
        for d, dataset in enumerate(analysis.datasets)
        for plot in _dataset_plots(analysis, f"d{d}", dataset, style)
    ]


def _dataset_plots(analysis: Analysis, key: str, dataset: str, style: enc.Encoding) -> list[Plot]:
    """The Pareto views, the 3-D front, parallel coordinates and NetScores of one dataset."""
    out = []
    for view in PLOT_VIEWS:
        front = analysis.fronts.get(view, {}).get(dataset)
        if front is not None:
            fig = pareto_2d(front, view, style)
            text = front_summary(front) + sample_note(front.table)
            out.append(Plot(f"{key}-{view}", dataset, VIEW_TITLES[view], text, fig))
    front = analysis.fronts.get("accuracy_memory_energy", {}).get(dataset)
    if front is not None:
        title = VIEW_TITLES["accuracy_memory_energy"]
        fig = pareto_3d(front, style)
        text = front_summary(front) + sample_note(front.table)
        out.append(Plot(f"{key}-3d", dataset, title, text, fig))
    configs = analysis.configs[analysis.configs["dataset"] == dataset]
    if len(configs):
        text = "Drag along an axis to select a range; colour is top-1 accuracy."
        title = "every configuration, parallel coordinates"
        text += sample_note(configs)
        out.append(Plot(f"{key}-parallel", dataset, title, text, parallel(drawn(configs))))
    scored = [v for v in analysis.variants if configs[v].notna().any()]
    if scored:
        text = (
            f"Best {NETSCORE_ROWS} configurations by {scored[0]}; each variant has its own dB "
            "scale (they are not comparable with each other)."
        )
        title = "NetScore family, one axis per variant"
        out.append(Plot(f"{key}-netscore", dataset, title, text, netscores(configs, scored, style)))
    return out


# ---------------------------------------------------------------- Pareto views


def pareto_2d(front: pareto.Front, view: str, style: enc.Encoding) -> dict[str, Any]:
    """Configurations per method, the front as a staircase, the knee, labels on the front."""
    xcol, ycol = view_axes(view)
    table = drawn(front.table)
    names = set(labelled(front, xcol).index)
    where = _text_positions(table[xcol])
    traces = []
    kind = "scattergl" if len(table) > WEBGL_FROM else "scatter"
    for method, rows in _by_method(table):
        records = rows.to_dict("records")  # once: a wide table's rows are costly to build
        labels = [
            short_label(r) if i in names else "" for i, r in zip(rows.index, records, strict=True)
        ]
        traces.append(
            {
                "type": kind,
                "mode": "markers+text",
                "name": method,
                "showlegend": False,
                "x": _values(rows[xcol]),
                "y": _values(rows[ycol]),
                "error_x": _error(rows, xcol),
                "error_y": _error(rows, ycol),
                "text": labels,
                "textposition": [where[i] for i in rows.index],
                "textfont": {"size": 11, "color": "#333"},
                "hovertext": [hover(r, front, view) for r in records],
                "hoverinfo": "text",
                "customdata": _filters(records),
                "marker": _marker(records, style, size=11),
                "cliponaxis": False,
            }
        )
    pts = front.front.sort_values(xcol)
    knee = table[table["knee"]]
    traces += [
        {
            "type": "scatter",
            "mode": "lines",
            "name": "Pareto front",
            "legendgroup": "front",
            "legendgrouptitle": {"text": "front"},
            "x": _values(pts[xcol]),
            "y": _values(pts[ycol]),
            "line": {"shape": "hv", "color": "#000", "width": 1.5},
            "hoverinfo": "skip",
        },
        {
            "type": "scatter",
            "mode": "markers",
            "name": "knee",
            "legendgroup": "front",
            "x": _values(knee[xcol]),
            "y": _values(knee[ycol]),
            "marker": {"symbol": "circle-open", "size": 26, "color": "#d00", "line": {"width": 2}},
            "hoverinfo": "skip",
        },
        *key_traces(style, table),
    ]
    layout = {
        "height": HEIGHT_2D,
        "margin": MARGIN,
        "hovermode": "closest",
        "legend": LEGEND,
        "uirevision": "keep",
        "xaxis": {"title": {"text": _axis(xcol, table)}, "type": _scale(table[xcol])},
        "yaxis": {"title": {"text": _axis(ycol, table)}},
    }
    return {"data": traces, "layout": layout}


def pareto_3d(front: pareto.Front, style: enc.Encoding) -> dict[str, Any]:
    """Accuracy, memory and energy in 3-D; front members drawn larger."""
    table = drawn(front.table)
    traces = []
    for method, rows in _by_method(table):
        records = rows.to_dict("records")
        traces.append(
            {
                "type": "scatter3d",
                "mode": "markers",
                "name": method,
                "showlegend": False,
                "x": _values(rows["peak_mem_mb"]),
                "y": _values(rows["energy_j"]),
                "z": _values(rows["accuracy"]),
                "hovertext": [hover(r, front, "accuracy_memory_energy") for r in records],
                "hoverinfo": "text",
                "customdata": _filters(records),
                "marker": {
                    "color": style.colours[method],
                    "symbol": [
                        style.symbol_3d(enc.strategy(r), str(r["backbone"])) for r in records
                    ],
                    "size": [9 if r["pareto"] else 5 for r in records],
                    "line": {"color": "#000", "width": 1},
                },
            }
        )
    scene = {
        "xaxis": {"title": {"text": _axis("peak_mem_mb", table)}},
        "yaxis": {"title": {"text": _axis("energy_j", table)}},
        "zaxis": {"title": {"text": _axis("accuracy", table)}},
    }
    layout = {"height": HEIGHT_3D, "margin": {"l": 0, "r": 0, "t": 40, "b": 0}}
    layout.update(scene=scene, legend=LEGEND, uirevision="keep")
    return {"data": [*traces, *key_traces(style, table, three_d=True)], "layout": layout}


def key_traces(
    style: enc.Encoding, table: pd.DataFrame, three_d: bool = False
) -> list[dict[str, Any]]:
    """The legend: an entry per method (colour), checkpointing strategy (shape) and
    backbone (fill) in ``table``; the page's script filters the plots by them
    (``meta.filter``), every plot of the page at once."""
    rows = _factors(table)
    methods = sorted({method_name(r) for r in rows})
    strategies = sorted({enc.strategy(r) for r in rows}, key=lambda c: style.shapes[c])
    backbones = sorted({str(r["backbone"]) for r in rows})
    symbol = style.symbol_3d if three_d else style.symbol
    keys = [("method", m, "circle", "colour", style.colours[m]) for m in methods]
    keys += [("checkpointing", c, symbol(c, backbones[0]), "shape", "#555") for c in strategies]
    keys += [("backbone", b, symbol(strategies[0], b), "fill", "#555") for b in backbones]
    # an empty trace of the plot's own type, so that a 3-D plot gets no 2-D axes
    empty = {"type": "scatter3d", "z": [None]} if three_d else {"type": "scatter"}
    return [
        {
            **empty,
            "mode": "markers",
            "name": value,
            "legendgroup": factor,
            "legendgrouptitle": {"text": f"{factor} ({what})"},
            "x": [None],
            "y": [None],
            "marker": {"symbol": symbol, "size": 11, "color": colour, "line": {"width": 1.5}},
            "hoverinfo": "skip",
            "meta": {"filter": factor, "value": value},
        }
        for factor, value, symbol, what, colour in keys
    ]


def hover(row: Mapping[str, Any], front: pareto.Front, view: str) -> str:
    """The configuration, its seeds and every objective as mean ± std (HTML-escaped)."""
    lines = [
        f"<b>{html.escape(str(row['config']))}</b>",
        f"{html.escape(front.dataset)}: {row['seeds']} ok seed(s) of {row['trials']} trial(s)",
        f"accuracy {pm(row, 'accuracy')}",
        f"peak memory {pm(row, 'peak_mem_mb')} MiB",
    ]
    if _known(row.get("energy_j")):
        note = f", {row['energy_note']}" if row.get("energy_note") else ""
        source = html.escape(str(row.get("energy_source") or "?"))
        lines.append(f"energy {pm(row, 'energy_j')} J ({source}{note})")
    if _known(row.get("train_time_s")):
        lines.append(f"train time {pm(row, 'train_time_s')} s")
    if row["pareto"]:
        lines.append("on the Pareto front" + (" (knee)" if row["knee"] else ""))
    return "<br>".join(lines)


def _by_method(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    methods = [method_name(r) for r in _factors(table)]
    return list(table.assign(_method=methods).groupby("_method", sort=True))


def _factors(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Each row's backbone, method, baseline and checkpointing (not every column: fast)."""
    columns = [c for c in ("backbone", "method", "baseline", "checkpointing") if c in table]
    return table[columns].to_dict("records")


def _filters(records: list[dict[str, Any]]) -> list[list[str]]:
    """[backbone, checkpointing, method] per point: what the page's filters match."""
    return [[str(r["backbone"]), enc.strategy(r), method_name(r)] for r in records]


def _text_positions(x: pd.Series) -> dict[Any, str]:
    """A label to the left of points in the right third of the x range, else to the right,
    so that labels stay inside the plot."""
    values = np.log10(x) if _scale(x) == "log" else x.astype(float)
    lo, span = values.min(), (values.max() - values.min()) or 1.0
    return {i: "top left" if (v - lo) / span > 0.66 else "top right" for i, v in values.items()}


def _marker(records: list[dict[str, Any]], style: enc.Encoding, size: int) -> dict[str, Any]:
    colour = style.colours[method_name(records[0])]
    return {
        "color": colour,
        "symbol": [style.symbol(enc.strategy(r), str(r["backbone"])) for r in records],
        "size": size,
        "line": {"color": colour, "width": 1.5},
    }


def _error(rows: pd.DataFrame, column: str) -> dict[str, Any]:
    """Seed spread as error bars; none where it is unknown or zero (no cap drawn)."""
    std = rows.get(f"{column}_std", pd.Series(np.nan, index=rows.index))
    values = [v if v else None for v in _values(std)]
    visible = any(v is not None for v in values)
    return {"type": "data", "array": values, "visible": visible, "thickness": 1, "width": 3}


def _values(series: pd.Series) -> list[float | None]:
    return [float(v) if _known(v) else None for v in series]


def _known(value: Any) -> bool:
    return value is not None and not pd.isna(value) and math.isfinite(float(value))


def _scale(values: pd.Series) -> str:
    """``log`` when positive values span more than 50x, else ``linear``."""
    lo, hi = values.min(), values.max()
    return "log" if lo > 0 and hi / lo > 50 else "linear"


def _axis(column: str, table: pd.DataFrame) -> str:
    """An axis title; energy says when it is estimated or a share."""
    title = axis_title(column)
    if column == "energy_j":
        notes = sorted({n for note in table["energy_note"] for n in note.split(", ") if n})
        if notes:
            title = f"{title[:-1]}; includes {' and '.join(notes)})"
    return title


# ---------------------------------------------------------------- all configurations


def parallel(configs: pd.DataFrame) -> dict[str, Any]:
    """Every configuration of a dataset on parallel axes: its factors, then its measures."""
    dims = []
    for factor in ("backbone", "method", "checkpointing", "budget_mb"):
        if factor == "method":
            values = [method_name(r) for r in _factors(configs)]
        else:
            values = [str(v) if factor != "budget_mb" else f"{v:g}" for v in configs[factor]]
        levels = sorted(set(values))
        if factor == "budget_mb" and len(levels) < 2:
            continue
        dims.append(
            {
                "label": factor,
                "values": [levels.index(v) for v in values],
                "tickvals": list(range(len(levels))),
                "ticktext": levels,
            }
        )
    for column in ("accuracy", "peak_mem_mb", "energy_j", "train_time_s"):
        if column in configs and configs[column].notna().all():
            dims.append({"label": axis_title(column), "values": _values(configs[column])})
    line = {
        "color": _values(configs["accuracy"]),
        "colorscale": "Viridis",
        "showscale": True,
        "colorbar": {"title": {"text": "top-1"}},
    }
    trace = {"type": "parcoords", "dimensions": dims, "line": line}
    return {
        "data": [trace],
        "layout": {"height": 460, "margin": {"l": 90, "r": 40, "t": 60, "b": 30}},
    }


# ---------------------------------------------------------------- NetScore


def netscores(configs: pd.DataFrame, variants: list[str], style: enc.Encoding) -> dict[str, Any]:
    """One axis per NetScore variant (each its own dB scale), the same configurations on
    every row, best first by the first variant."""
    best = configs.sort_values(variants[0], ascending=True, na_position="first")
    best = best.tail(NETSCORE_ROWS)
    labels = [str(c) for c in best["config"]]
    colours = [style.colours[method_name(r)] for r in _factors(best)]
    width, gap = 1.0 / len(variants), 0.02
    traces, layout = [], {}
    for i, name in enumerate(variants):
        axis = "" if i == 0 else str(i + 1)
        traces.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": name,
                "showlegend": False,
                "x": _values(best[name]),
                "y": labels,
                "xaxis": f"x{axis}",
                "yaxis": "y",
                "error_x": _error(best, name),
                "marker": {"color": colours, "size": 9},
                "hovertext": [
                    f"{html.escape(c)}<br>{name} {pm(r, name)} dB"
                    for c, r in zip(labels, best.to_dict("records"), strict=True)
                ],
                "hoverinfo": "text",
            }
        )
        layout[f"xaxis{axis}"] = {
            "domain": [i * width + gap / 2, (i + 1) * width - gap / 2],
            "title": {"text": _score_title(name, best)},
            "zeroline": False,
        }
    layout["yaxis"] = {"automargin": True, "tickfont": {"size": 11}}
    layout.update(height=26 * len(best) + 130, margin={"l": 10, "r": 10, "t": 20, "b": 60})
    layout["showlegend"] = False
    return {"data": traces, "layout": layout}


def _score_title(name: str, configs: pd.DataFrame) -> str:
    """``NetScore-E (dB)``; an energy-based score says when its energy is not a measurement."""
    title = f"{netscore.VARIANTS[name].title.split(':')[0]} (dB)"
    notes = sorted({n for note in configs["energy_note"] for n in note.split(", ") if n})
    return f"{title}<br>energy {' / '.join(notes)}" if uses_energy(name) and notes else title
