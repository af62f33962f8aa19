"""The PNG figures (for papers and readers without JavaScript): ``pareto.png`` and
``netscore.png``, drawn with matplotlib in the page's encoding (``encoding``).

``pareto.png``: one panel per dataset and objective pair, seed spread as error bars,
the front as a staircase, its knee ringed and its points labelled. ``netscore.png``:
small multiples, one axis per NetScore variant (their dB scales are not comparable),
the same configurations on every row.
"""

from __future__ import annotations

import io
import logging
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
from orchestrator.report.tables import uses_energy

log = logging.getLogger(__name__)

# Front points labelled per panel at most (evenly spaced along the front, knee included).
LABELS_PER_PANEL = 6
MARKER_PT = 6.5  # marker size, points
LEGEND_BACKBONES = 8  # backbones named in the legend at most (their fills repeat every 4)
# Configurations a view draws at most (PNG panel or page plot): every front point, then an
# even sample of the others (10^4 points with hover texts would make the page tens of MB).
MAX_POINTS = 1500


def pareto_figure(analysis: Analysis) -> bytes:
    """One panel per dataset and objective pair: configurations with seed spread, front, knee."""
    plt = _pyplot()
    views = [v for v in PLOT_VIEWS if v in analysis.fronts]
    datasets = analysis.datasets or ["(none)"]
    ncols = max(len(views), 1)
    height = 4.4 * len(datasets) + 1.0
    fig, axes = plt.subplots(len(datasets), ncols, figsize=(5.6 * ncols, height), squeeze=False)
    style = enc.of_configs(analysis.configs)
    for r, dataset in enumerate(datasets):
        if not views:
            _blank(axes[r][0], "no ok trial to plot")
        for c, view in enumerate(views):
            front = analysis.fronts[view].get(dataset)
            axes[r][c].set_title(f"{dataset}: {VIEW_TITLES[view]}", fontsize=9)
            if front is None:
                _blank(axes[r][c], "no ok trial with these values")
            else:
                _panel(axes[r][c], front, view, style)
    handles = _legend(style)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7)
    fig.tight_layout(rect=(0, 0.9 / height, 1, 1))
    return _png(fig, plt)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _blank(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()


def _panel(ax: Any, front: pareto.Front, view: str, style: enc.Encoding) -> None:
    xcol, ycol = view_axes(view)
    _points(ax, drawn(front.table), xcol, ycol, style)
    pts = front.front.sort_values(xcol)
    ax.step(pts[xcol], pts[ycol], where="post", color="black", linewidth=1.1, alpha=0.8)
    knee = front.table[front.table["knee"]]
    ax.scatter(knee[xcol], knee[ycol], s=200, fc="none", ec="red", lw=1.4, zorder=3)
    for row in labelled(front, xcol).to_dict("records"):
        ax.annotate(
            short_label(row),
            (row[xcol], row[ycol]),
            xytext=(4, 5),
            textcoords="offset points",
            fontsize=6.5,
            color="#333",
        )
    x = front.table[xcol]
    if x.min() > 0 and x.max() / x.min() > 50:
        ax.set_xscale("log")
    energy = "energy_j" in (xcol, ycol)
    estimated = energy and front.table["energy_note"].str.contains("estimated").any()
    for set_label, col in ((ax.set_xlabel, xcol), (ax.set_ylabel, ycol)):
        note = ", estimated" if estimated and col == "energy_j" else ""
        set_label(axis_title(col)[:-1] + note + ")", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)


def drawn(table: pd.DataFrame, limit: int = MAX_POINTS) -> pd.DataFrame:
    """``table`` if it has at most ``limit`` rows, else its front rows (``pareto``) and an
    even sample of the others (their order is the front's: best first), in table order."""
    if len(table) <= limit:
        return table
    front = table["pareto"].astype(bool) if "pareto" in table else table.index.isna()
    others = table.index[~front]
    keep = max(limit - int(front.sum()), 0)
    picks = others[np.unique(np.linspace(0, len(others) - 1, keep).round().astype(int))]
    return table[front | table.index.isin(picks if keep else [])]


def sample_note(table: pd.DataFrame, limit: int = MAX_POINTS) -> str:
    """The caption's note on a sampled view ('' when every configuration is drawn)."""
    if len(table) <= limit:
        return ""
    return (
        f" {len(drawn(table, limit))} of {len(table)} configurations drawn: every front point "
        "and an even sample of the others (every trial: `orchestrate collect DIR`)."
    )


def _points(ax: Any, table: pd.DataFrame, xcol: str, ycol: str, style: enc.Encoding) -> None:
    """Every configuration: seed spread (std) as error bars in two line collections, then
    the markers, one scatter per shape and fill: thousands of configurations in a few calls."""
    rows = table[[c for c in ("method", "baseline", "checkpointing") if c in table]]
    rows = rows.to_dict("records")
    colours = np.array([style.colours[method_name(r)] for r in rows])
    markers = np.array([style.marker(enc.strategy(r)) for r in rows])
    fills = np.array([style.fill(str(b)) for b in table["backbone"]])
    x, y = table[xcol].to_numpy(dtype=float), table[ycol].to_numpy(dtype=float)
    xerr, yerr = _std(table, xcol), _std(table, ycol)
    bars = {"linewidth": 0.8, "alpha": 0.9, "zorder": 2}
    ax.hlines(
        y[xerr > 0], (x - xerr)[xerr > 0], (x + xerr)[xerr > 0], colors=colours[xerr > 0], **bars
    )
    ax.vlines(
        x[yerr > 0], (y - yerr)[yerr > 0], (y + yerr)[yerr > 0], colors=colours[yerr > 0], **bars
    )
    for marker in dict.fromkeys(markers):
        for fill in dict.fromkeys(fills):
            look = (markers == marker) & (fills == fill)
            if not look.any():
                continue
            hollow = "open" in fill
            ax.scatter(
                x[look],
                y[look],
                marker=marker,
                s=MARKER_PT**2,
                facecolors="white" if hollow else colours[look],
                edgecolors=colours[look],
                alpha=0.9,
                zorder=3,
            )
            if "dot" in fill:
                dot = colours[look] if hollow else "white"
                ax.scatter(x[look], y[look], marker="o", s=4, c=dot, zorder=4)


def _std(table: pd.DataFrame, column: str) -> np.ndarray:
    """The seed std of ``column`` per row, 0 where there is none (one seed)."""
    std = table.get(f"{column}_std")
    if std is None:
        return np.zeros(len(table))
    return pd.to_numeric(std, errors="coerce").fillna(0.0).to_numpy(dtype=float)


def labelled(front: pareto.Front, xcol: str, limit: int = LABELS_PER_PANEL) -> pd.DataFrame:
    """The front points that carry a label: all of a short front, else ``limit`` of them
    evenly spaced along it, the knee always among them."""
    pts = front.front.sort_values(xcol)
    if len(pts) <= limit:
        return pts
    keep = set(np.linspace(0, len(pts) - 1, limit - 1).round().astype(int).tolist())
    keep |= {i for i, is_knee in enumerate(pts["knee"]) if is_knee}
    return pts.iloc[sorted(keep)]


def short_label(row: dict) -> str:
    """``backbone / method / checkpointing`` (the budget is in the hover and the tables)."""
    return f"{row['backbone']} / {method_name(row)} / {enc.strategy(row)}"


def _legend(style: enc.Encoding) -> list:
    from matplotlib.lines import Line2D

    def item(label: str, **kwargs: Any) -> Line2D:
        return Line2D([], [], linestyle="", label=label, **kwargs)

    handles = [item(m, color=c, marker="o") for m, c in style.colours.items()]
    handles += [item(c, color="grey", marker=style.marker(c)) for c in style.shapes]
    handles += [
        item(f"{b} ({style.fill(b)})", color="grey", marker="o", mfc="white")
        if "open" in style.fill(b)
        else item(f"{b} ({style.fill(b)})", color="grey", marker="o")
        for b in style.fills
    ][:LEGEND_BACKBONES]
    if len(style.fills) > LEGEND_BACKBONES:  # fills repeat anyway: the page's hover names them
        more = len(style.fills) - LEGEND_BACKBONES
        handles.append(item(f"+{more} backbones (fills repeat)", color="grey", marker=""))
    handles += [
        Line2D([], [], color="black", drawstyle="steps-post", label="Pareto front"),
        item("knee", color="red", marker="o", mfc="none", ms=12),
    ]
    return handles


def netscore_figure(analysis: Analysis, top: int = 25) -> bytes:
    """Small multiples: one axis per NetScore variant, the ``top`` configurations by the
    first variant on the rows, seed spread as error bars."""
    plt = _pyplot()
    variants, configs = analysis.variants, analysis.configs
    best = configs.nlargest(top, variants[0]).iloc[::-1] if variants else configs.iloc[:0]
    if best.empty:
        fig, ax = plt.subplots(figsize=(6.0, 2.0))
        _blank(ax, "no NetScore computed")
        return _png(fig, plt)
    cols = len(variants)
    fig, axes = plt.subplots(
        1, cols, figsize=(3.4 + 2.1 * cols, 0.26 * max(len(best), 4) + 1.6), sharey=True
    )
    axes = np.atleast_1d(axes)
    rows = np.arange(len(best))
    style = enc.of_configs(configs)
    colours = [style.colours[method_name(r)] for r in best.to_dict("records")]
    for ax, name in zip(axes, variants, strict=True):
        ax.errorbar(
            best[name], rows, xerr=best[f"{name}_std"].fillna(0.0), fmt="none", ecolor="grey"
        )
        ax.scatter(best[name], rows, c=colours, s=22, zorder=3)
        title = netscore.VARIANTS[name].title.split(":")[0]
        notes = sorted({n for note in best["energy_note"] for n in note.split(", ") if n})
        if uses_energy(name) and notes:
            title += f"\n(energy {' / '.join(notes)})"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("dB", fontsize=7)
        ax.tick_params(axis="x", labelsize=6.5)
        ax.grid(True, axis="x", alpha=0.3)
    labels = [f"{r['dataset']}: {r['config']}" for r in best.to_dict("records")]
    axes[0].set_yticks(rows, labels, fontsize=6.5)
    fig.tight_layout()
    return _png(fig, plt)


def _png(fig: Any, plt: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
