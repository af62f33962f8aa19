"""benchmarks/report_scale.py on a small sweep: its records are what a sweep writes
(collected as one table, every status present) and its report run measures a child."""

from __future__ import annotations

from pathlib import Path

from benchmarks import report_scale
from orchestrator.records import RecordStore


def test_synthetic_sweep_reads_as_records_and_reports(tmp_path: Path) -> None:
    report_scale.synthesise(300, tmp_path)
    table = RecordStore(tmp_path).collect()
    assert len(table) == 300 and table["trial_id"].is_unique
    assert {"ok", "oom", "over_budget", "failed"} <= set(table["status"])
    ok = table[table["status"] == "ok"]
    assert ok["accuracy"].between(0, 1).all() and (ok["energy_j"] > 0).all()
    assert set(table["checkpointing"]) <= set(report_scale.CHECKPOINTING)
    assert (table.groupby("spec_json")["seed"].nunique() <= report_scale.SEEDS).all()
    _, cpu, rss_gb, status = report_scale.report(tmp_path)
    assert status == 0 and (tmp_path / "report.html").stat().st_size > 0
    assert 0 < cpu and 0.05 < rss_gb < report_scale.TARGET_GB  # a Python process's own size
