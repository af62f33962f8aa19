"""The report at scale (issue 22): what keeps 100,000 records fast and the page small,
checked on small tables (benchmarks/report_scale.py measures the time and memory)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import orchestrator.report.plots as plot_specs
from orchestrator.records import RecordStore
from orchestrator.report import analyse, write_report
from orchestrator.report.analysis import reported_columns
from orchestrator.report.findings import NAMED, findings
from orchestrator.report.tables import PROBLEMS_LISTED
from tests.orchestrator.test_report import sweep_records

FAILED, OOM = 200, 50


def _with_failures() -> pd.DataFrame:
    """The synthetic sweep (2 of its trials not ok) plus 200 failed and 50 oom trials."""
    records = sweep_records(seeds=1)
    template = {**records.iloc[0].to_dict(), "accuracy": None, "peak_mem_mb": None}
    extra = [
        {
            **template,
            "trial_id": f"x{i:04d}",
            "seed": 100 + i,
            "status": "failed" if i < FAILED else "oom",
            "error": "Traceback (most recent call last):\n  x\nRuntimeError: boom"
            if i < FAILED
            else "CUDA out of memory",
        }
        for i in range(FAILED + OOM)
    ]
    return pd.concat([records, pd.DataFrame(extra)], ignore_index=True)


def test_failures_past_the_limit_are_counted_by_error(tmp_path: Path) -> None:
    records = _with_failures()
    bad = int((records["status"] != "ok").sum())
    assert bad == FAILED + OOM + 2 > PROBLEMS_LISTED
    files = write_report(records, RecordStore(tmp_path), "many failures")
    page = Path(files.html).read_text()
    assert page.count("<td class='err'>") == PROBLEMS_LISTED  # listed one by one
    assert f"{bad} trials did not finish ok" in page
    kinds = page.split("id='failures'")[1].split("</table>")[0]  # the counts come first
    assert "RuntimeError: boom</td>" in kinds and f"<td>{FAILED}</td>" in kinds
    assert f"<td>{OOM + 1}</td>" in kinds  # the sweep's own oom0 has the same error
    md = Path(files.markdown).read_text()
    failures = md.split("## Trials that did not finish ok")[1]
    assert f"| failed | RuntimeError: boom | {FAILED} |" in failures
    assert f"| oom | CUDA out of memory | {OOM + 1} |" in failures
    # listed by status, then id: the sweep's fail0, then x0000..x0198
    assert "| fail0 | failed |" in failures and failures.count("| x0") == PROBLEMS_LISTED - 1


def test_few_failures_are_listed_without_counts() -> None:
    from orchestrator.report.page import _problems

    listing = _problems(sweep_records(seeds=1))
    assert listing.count("<td class='err'>") == 2 and "did not finish ok" not in listing


def test_budget_statement_names_a_bounded_number_of_configurations() -> None:
    rows = sweep_records(seeds=1).iloc[:1].to_dict("records")
    over = NAMED + 8
    for i in range(over):
        rows.append(
            {**rows[0], "trial_id": f"o{i}", "backbone": f"b{i:02d}", "status": "over_budget"}
        )
    made, _ = findings(pd.DataFrame(rows)).topic("budget")
    text = made[0].text
    assert text.startswith(f"1 of {over + 1} configurations fit the 2048 MiB budget")
    assert text.count("(over_budget 1)") == NAMED and text.endswith("; and 8 more")
    assert len(made[0].trials) == over + 1  # the statement still rests on every trial


def test_report_table_keeps_numbers_and_shown_text_only() -> None:
    records = sweep_records(seeds=1).assign(
        spec_json="{}", versions='{"torch": "2.6"}', host="node01", steps=7, ckpt_plan="[]"
    )
    kept = reported_columns(records)
    assert {"spec_json", "versions", "host", "ckpt_plan"}.isdisjoint(kept.columns)
    assert {"trial_id", "status", "error", "backbone", "method", "energy_source"} <= set(kept)
    assert {"steps", "accuracy", "peak_mem_mb", "energy_exclusive"} <= set(kept)
    assert len(kept) == len(records)


@pytest.mark.parametrize(("webgl_from", "kind"), [(2000, "scatter"), (3, "scattergl")])
def test_many_points_are_drawn_with_webgl(
    webgl_from: int, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plot_specs, "WEBGL_FROM", webgl_from)
    figures = plot_specs.plots(analyse(sweep_records(seeds=1)))
    view = next(p for p in figures if p.id.endswith("accuracy_memory"))
    methods = [t for t in view.figure["data"] if t.get("hovertext")]
    assert methods and {t["type"] for t in methods} == {kind}


def test_a_sampled_view_keeps_every_front_point() -> None:
    analysis = analyse(sweep_records(seeds=1))
    front = analysis.fronts["accuracy_memory"]["digits"]
    on_front = int(front.table["pareto"].sum())
    limit = on_front + 3
    assert len(front.table) > limit  # else nothing to sample
    shown = plot_specs.drawn(front.table, limit)
    assert len(shown) == limit and shown["pareto"].sum() == on_front
    assert list(shown.index) == [i for i in front.table.index if i in shown.index]  # order kept
    note = plot_specs.sample_note(front.table, limit)
    assert note.startswith(f" {limit} of {len(front.table)} configurations drawn")
    assert (
        plot_specs.drawn(front.table) is front.table and plot_specs.sample_note(front.table) == ""
    )


def test_per_configuration_tables_and_comparisons_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from orchestrator.report import tables
    from orchestrator.report.findings import Finding

    analysis = analyse(sweep_records(seeds=1))
    monkeypatch.setattr(tables, "TABLE_ROWS", 5)
    assert len(tables.netscore_display(analysis)) == 5
    assert len(tables.netscore_components(analysis)) == 5
    best = analysis.configs.nlargest(5, analysis.variants[0])
    shown = tables.netscore_display(analysis)
    assert list(shown["configuration"]) == list(best["config"])  # the best five, best first
    assert tables.netscore_note(analysis).startswith(
        f"The best 5 of {len(analysis.configs)} configurations by {analysis.variants[0]}"
    )
    finding = Finding("methods", "d", "text", (), details=tuple(f"pair {i}" for i in range(7)))
    assert finding.shown_details(limit=3) == [
        "pair 0",
        "pair 1",
        "pair 2",
        "… and 4 more comparisons",
    ]
    assert finding.shown_details(limit=7) == [f"pair {i}" for i in range(7)]


def test_png_legend_names_a_bounded_number_of_backbones() -> None:
    from orchestrator.report import encoding
    from orchestrator.report.figures import LEGEND_BACKBONES, _legend

    names = [f"bb{i:02d}" for i in range(LEGEND_BACKBONES + 5)]
    style = encoding.encoding(["lora"] * len(names), ["none"] * len(names), names)
    labels = [h.get_label() for h in _legend(style)]
    assert [x for x in labels if x.startswith("bb")] == [
        f"{b} ({style.fill(b)})" for b in names[:LEGEND_BACKBONES]
    ]
    assert "+5 backbones (fills repeat)" in labels
    few = encoding.encoding(["lora", "lora"], ["none", "none"], ["a", "b"])
    assert not any("backbones" in x for x in (h.get_label() for h in _legend(few)))
