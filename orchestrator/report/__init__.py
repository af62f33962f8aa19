"""The sweep report: ``report.html``, ``report.md``, ``pareto.png`` and ``netscore.png``.

One module per part: ``analysis`` computes every number once from the collected records
(through the pure functions of ``orchestrator.pareto`` and ``orchestrator.netscore``),
``findings`` states the seed paper's kind of results from them, ``tables`` lays them out
as tables, ``encoding`` says how a configuration looks, ``figures`` draws the PNGs,
``plots`` the page's Plotly figures, ``markdown`` and ``page`` write the two documents.
The page's CSS, script and template are files in ``assets/`` (package data).

Example:
    >>> files = write_report(store.collect(), store, "smoke")
    >>> files.html, files.findings[:1]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from orchestrator import netscore
from orchestrator.records import RecordStore
from orchestrator.report.analysis import Analysis, analyse, energy_note, reported_columns
from orchestrator.report.figures import netscore_figure, pareto_figure
from orchestrator.report.findings import Findings, findings
from orchestrator.report.markdown import render_markdown
from orchestrator.report.page import render_html
from orchestrator.report.section import Section
from orchestrator.report.tables import front_display, front_summary, markdown_table

log = logging.getLogger(__name__)

__all__ = [
    "Analysis",
    "Findings",
    "ReportFiles",
    "Section",
    "analyse",
    "energy_note",
    "findings",
    "front_display",
    "front_summary",
    "markdown_table",
    "write_report",
]


@dataclass(frozen=True)
class ReportFiles:
    """Paths of the files written (the page, the Pareto figure, the Markdown, every PNG)
    and the findings, one line each, for the command line to print."""

    html: str
    png: str
    markdown: str
    figures: tuple[str, ...]
    findings: tuple[str, ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        """Every file written, the page first."""
        return (self.html, self.markdown, *self.figures)

    def listing(self) -> str:
        """Every file written, one a line, the page first."""
        return "\n".join([f"report: {self.paths[0]}", *(f"        {p}" for p in self.paths[1:])])

    def summary(self) -> str:
        """What the command line prints: every file written, then the findings."""
        lines = [self.listing()]
        if self.findings:
            lines += ["", "Findings:", *(f"- {line}" for line in self.findings)]
        return "\n".join(lines)


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
    df = reported_columns(df)
    analysis = analyse(df, alpha=alpha, beta=beta, gamma=gamma)
    found = findings(df)
    figures = {"pareto.png": pareto_figure(analysis), "netscore.png": netscore_figure(analysis)}
    prefix = f"{folder.strip('/')}/" if folder else ""
    paths = {name: store.write_bytes(prefix + name, png) for name, png in figures.items()}
    markdown = render_markdown(analysis, found, title, figures, sections).encode("utf-8")
    page = render_html(analysis, found, title, figures, sections).encode("utf-8")
    log.info("report: %d trials, %d configurations", len(df), len(analysis.configs))
    return ReportFiles(
        html=store.write_bytes(prefix + "report.html", page),
        png=paths["pareto.png"],
        markdown=store.write_bytes(prefix + "report.md", markdown),
        figures=tuple(paths.values()),
        findings=tuple(found.lines()),
    )
