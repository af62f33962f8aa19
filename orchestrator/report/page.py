"""``report.html``: one self-contained page that works offline.

The page is ``assets/page.html`` filled in: ``assets/report.css``, the findings and
tables as HTML, every figure of ``plots`` as JSON, plotly.js (from the ``plotly``
package) and ``assets/report.js``, which draws the figures. The PNG figures are
embedded too, for readers without JavaScript.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from importlib import resources
from string import Template
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import pareto
from orchestrator.report.analysis import VIEW_TITLES, Analysis
from orchestrator.report.findings import TOPICS, Findings
from orchestrator.report.plots import plots
from orchestrator.report.section import Section
from orchestrator.report.tables import (
    COMPARED,
    PROBLEM_COLUMNS,
    PROBLEMS_LISTED,
    comparison,
    definitions,
    error_line,
    formatted,
    front_display,
    front_summary,
    netscore_components,
    netscore_display,
    netscore_note,
    num,
    problem_kinds,
    problems,
    problems_note,
)

log = logging.getLogger(__name__)

NAV = (
    ("findings", "Findings"),
    ("plots", "Plots"),
    ("reading", "How to read this"),
    ("fronts", "Fronts"),
    ("netscore", "NetScore"),
    ("comparisons", "By method, backbone, checkpointing"),
    ("failures", "Failures"),
    ("figures", "PNG figures"),
)


def asset(name: str) -> str:
    """A file of ``orchestrator/report/assets`` (package data) as text."""
    return resources.files("orchestrator.report").joinpath("assets", name).read_text("utf-8")


def render_html(
    analysis: Analysis,
    found: Findings,
    title: str,
    figures: Mapping[str, bytes],
    sections: Sequence[Section] = (),
) -> str:
    """The whole page as a string."""
    from plotly.offline import get_plotlyjs

    figs = [asdict(p) for p in plots(analysis)]
    data = {"datasets": analysis.datasets, "plots": figs}
    body = [
        _header(analysis, title),
        *[_section(s) for s in sections],
        findings_html(found),
        _plots(analysis, figs),
        _reading(analysis),
        _fronts(analysis),
        _netscore(analysis),
        _comparisons(analysis),
        f"<h2 id='failures'>Trials that did not finish ok</h2>{_problems(analysis.records)}",
        _figures(figures),
    ]
    return Template(asset("page.html")).substitute(
        title=html.escape(title),
        css=asset("report.css"),
        body="\n".join(body),
        data=_script_json(data),
        plotly=get_plotlyjs(),
        script=asset("report.js"),
    )


def _script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element (no '<', '>' or '&' left as is)."""
    text = json.dumps(_json_safe(value), allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


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


def _header(analysis: Analysis, title: str) -> str:
    counts = ", ".join(f"{k}: {v}" for k, v in pareto.status_counts(analysis.records).items())
    links = " ".join(f"<a href='#{anchor}'>{text}</a>" for anchor, text in NAV)
    return (
        f"<h1>{html.escape(title)}</h1><p>{len(analysis.records)} trials "
        f"({html.escape(counts)}).</p><nav>{links}"
        "<label>dataset <select id='dataset'></select></label></nav>"
    )


def _section(section: Section) -> str:
    esc = html.escape
    return f"<h2>{esc(section.title)}</h2><p>{esc(section.text)}</p>{table_html(section.table)}"


def findings_html(found: Findings) -> str:
    """Per topic: each statement, its caveats, and its comparisons and trials folded."""
    esc = html.escape
    parts = ["<section id='findings'><h2>Findings</h2>"]
    for topic, heading in TOPICS.items():
        made, omitted = found.topic(topic)
        if not made and not omitted:
            continue
        parts.append(f"<h3>{esc(heading)}</h3><ul class='findings'>")
        for f in made:
            caveats = "".join(f"<br><span class='caveat'>{esc(c)}</span>" for c in f.caveats)
            details = "".join(f"<li>{esc(d)}</li>" for d in f.shown_details())
            parts.append(
                f"<li><b>{esc(f.dataset)}</b>: <span class='statement'>{esc(f.text)}</span>"
                f"{caveats}<details><summary>"
                f"the {len(f.trials)} trial{'s' * (len(f.trials) != 1)}</summary><ul>{details}</ul>"
                f"<p class='ids'>{esc(f.trial_list())}</p></details></li>"
            )
        parts.append("</ul>")
        if omitted:
            lines = "; ".join(o.line() for o in omitted)
            parts.append(f"<p class='omitted'>Not stated: {esc(lines)}.</p>")
    return "".join(parts) + "</section>"


def _plots(analysis: Analysis, figs: list[dict[str, Any]]) -> str:
    esc = html.escape
    parts = [
        "<section id='plots'><h2>Plots</h2><noscript><p>The interactive plots need "
        "JavaScript; the same fronts are drawn in the PNG figures at the end.</p></noscript>",
        "<p class='caption'>Drag to zoom, double-click to reset; hover a point for its "
        "configuration; click a legend entry to hide a method, a checkpointing strategy "
        "(shape) or a backbone (fill) in every plot.</p>",
    ]
    for dataset in analysis.datasets:
        parts.append(f"<section class='dataset' data-dataset='{esc(dataset, quote=True)}'>")
        for fig in (f for f in figs if f["dataset"] == dataset):
            parts.append(
                f"<figure class='plot'><h3>{esc(dataset)}: {esc(fig['title'])}</h3>"
                f"<div class='plotly-box' id='plot-{fig['id']}'></div>"
                f"<p class='caption'>{esc(fig['caption'])}</p></figure>"
            )
        parts.append("</section>")
    if not analysis.datasets:
        parts.append("<p>No trial to plot.</p>")
    return "".join(parts) + "</section>"


def _reading(analysis: Analysis) -> str:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in definitions(analysis))
    return f"<h2 id='reading'>How to read this</h2><ul>{items}</ul>"


def _fronts(analysis: Analysis) -> str:
    parts = ["<h2 id='fronts'>Pareto fronts</h2>"]
    for dataset in analysis.datasets:
        parts.append(f"<h3>{html.escape(dataset)}</h3>")
        for view in pareto.VIEWS:
            front = analysis.fronts.get(view, {}).get(dataset)
            if front is not None:
                parts.append(
                    f"<h4>{html.escape(VIEW_TITLES[view])}</h4>"
                    f"<p>{html.escape(front_summary(front))}</p>{table_html(front_display(front))}"
                )
    return "".join(parts)


def _netscore(analysis: Analysis) -> str:
    return (
        "<h2 id='netscore'>NetScore (per configuration, mean ± std over seeds, dB)</h2>"
        + (f"<p>{html.escape(note)}</p>" if (note := netscore_note(analysis)) else "")
        + table_html(netscore_display(analysis), "(no NetScore computed)")
        + "<details><summary>the components every score is computed from</summary>"
        + table_html(netscore_components(analysis), "(none)")
        + "</details>"
    )


def _comparisons(analysis: Analysis) -> str:
    parts = ["<h2 id='comparisons'>By method, backbone and checkpointing</h2>"]
    for factor in COMPARED:
        parts += [f"<h3>By {html.escape(factor)}</h3>", table_html(comparison(analysis, factor))]
    return "".join(parts)


def _figures(figures: Mapping[str, bytes]) -> str:
    parts = ["<h2 id='figures'>PNG figures</h2>"]
    for name, png in figures.items():
        img = base64.b64encode(png).decode("ascii")
        alt = html.escape(name, quote=True)
        parts.append(f"<p><img alt='{alt}' src='data:image/png;base64,{img}'></p>")
    return "".join(parts)


def table_html(df: pd.DataFrame, empty: str = "(none)") -> str:
    if df.empty:
        return f"<p>{html.escape(empty)}</p>"
    return formatted(df).to_html(index=False, border=0, escape=True, na_rep="")


def _problems(records: pd.DataFrame) -> str:
    """Failed trials as a table; the whole error text folds out under its last line. Past
    ``PROBLEMS_LISTED`` of them, they are counted by error first and the rest not listed."""
    bad = problems(records)
    if bad.empty:
        return "<p>(none)</p>"
    note = problems_note(records)
    counted = f"{table_html(problem_kinds(records))}<p>{html.escape(note)}</p>" if note else ""
    return counted + _problem_rows(bad.head(PROBLEMS_LISTED))


def _problem_rows(bad: pd.DataFrame) -> str:
    cols = [c for c in PROBLEM_COLUMNS if c in bad]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [*cols, "error"])
    body = []
    for row in bad.to_dict("records"):
        cells = "".join(f"<td>{html.escape(num(row[c]))}</td>" for c in cols)
        error = str(row.get("error") or "")
        cells += (
            f"<td class='err'><details><summary>{html.escape(error_line(error))}</summary>"
            f"<pre>{html.escape(error)}</pre></details></td>"
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
