"""``report.md``: the report as Markdown (the caller's sections, findings, how to read
it, fronts per dataset, NetScore, comparisons, failures, the PNG figures)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from orchestrator import pareto
from orchestrator.report.analysis import VIEW_TITLES, Analysis
from orchestrator.report.findings import TOPICS, Findings
from orchestrator.report.section import Section
from orchestrator.report.tables import (
    COMPARED,
    comparison,
    definitions,
    front_display,
    front_summary,
    markdown_table,
    netscore_components,
    netscore_display,
    netscore_note,
    problem_kinds,
    problems_display,
    problems_note,
)

log = logging.getLogger(__name__)


def render_markdown(
    analysis: Analysis,
    found: Findings,
    title: str,
    figures: Mapping[str, bytes],
    sections: Sequence[Section] = (),
) -> str:
    """The whole report as one Markdown document."""
    records = analysis.records
    counts = ", ".join(f"{k}: {v}" for k, v in pareto.status_counts(records).items())
    parts = [f"# {title}", f"{len(records)} trials ({counts})."]
    for section in sections:
        table = markdown_table(section.table) if not section.table.empty else "(none)"
        parts += [f"## {section.title}", section.text, table]
    parts += findings_markdown(found)
    parts.append("## How to read this")
    parts.append("\n".join(f"- {line}" for line in definitions(analysis)))
    for dataset in analysis.datasets:
        parts.append(f"## Pareto analysis: {dataset}")
        for view in pareto.VIEWS:
            front = analysis.fronts.get(view, {}).get(dataset)
            if front is not None:
                parts += [f"### {VIEW_TITLES[view]}", front_summary(front)]
                parts.append(markdown_table(front_display(front)))
        if not any(dataset in f for f in analysis.fronts.values()):
            parts.append("(no ok trial)")
    parts.append("## NetScore (per configuration, mean ± std over seeds)")
    if note := netscore_note(analysis):
        parts.append(note)
    for table in (netscore_display(analysis), netscore_components(analysis)):
        parts.append(markdown_table(table) if not table.empty else "(no NetScore computed)")
    for factor in COMPARED:
        cmp = comparison(analysis, factor)
        parts += [f"## By {factor}", markdown_table(cmp) if not cmp.empty else "(no trial)"]
    problems = problems_display(records)
    parts.append("## Trials that did not finish ok")
    note = problems_note(records)
    if note:
        parts += [markdown_table(problem_kinds(records)), note]
    parts.append(markdown_table(problems) if not problems.empty else "(none)")
    parts += [f"![{name}]({name})" for name in figures]
    return "\n\n".join(parts) + "\n"


def findings_markdown(found: Findings) -> list[str]:
    """The Findings section: per topic, one bullet per statement with its caveats, its
    comparisons and its trials nested under it; then what was not stated and why."""
    parts = ["## Findings"]
    for topic, heading in TOPICS.items():
        made, omitted = found.topic(topic)
        if not made and not omitted:
            continue
        lines = []
        for f in made:
            lines.append(f"- **{f.dataset}**: {f.text}")
            lines += [f"  - *{c}*" for c in f.caveats]
            lines += [f"  - {d}" for d in f.shown_details()]
            lines.append(f"  - trials: {f.trial_list()}")
        lines += [f"- not stated: {o.line()}" for o in omitted]
        parts += [f"### {heading}", "\n".join(lines)]
    return parts
