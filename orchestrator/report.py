"""The sweep report: ``report.html`` (plots embedded), ``pareto.png`` and ``report.md``.

All numbers come from ``orchestrator.pareto`` over the collected records; this
module only lays them out and writes the files through the record store.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass

import pandas as pd

from orchestrator import pareto
from orchestrator.records import RecordStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportFiles:
    html: str
    png: str
    markdown: str


def pareto_plot(df: pd.DataFrame) -> bytes:
    """Accuracy vs peak memory, one colour per method, one marker per backbone, front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marked = pareto.pareto_front(df, pareto.BASE_OBJECTIVES)
    ok = marked[marked["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    markers = "osD^vP*Xh<>"
    methods = sorted(ok["method"].unique())
    backbones = sorted(ok["backbone"].unique())
    cmap = plt.get_cmap("tab10")
    for mi, method in enumerate(methods):
        for bi, backbone in enumerate(backbones):
            sel = ok[(ok["method"] == method) & (ok["backbone"] == backbone)]
            if sel.empty:
                continue
            ax.scatter(
                sel["peak_mem_mb"],
                sel["accuracy"],
                color=cmap(mi % 10),
                marker=markers[bi % len(markers)],
                s=46,
                alpha=0.85,
                edgecolor="black",
                linewidth=0.4,
                label=f"{method} / {backbone}",
            )
    front = ok[ok["pareto"]].sort_values("peak_mem_mb")
    if not front.empty:
        ax.step(
            front["peak_mem_mb"],
            front["accuracy"],
            where="post",
            color="black",
            linewidth=1.2,
            alpha=0.7,
            label="Pareto front",
        )
    ax.set_xlabel("peak memory (MiB, " + ", ".join(sorted(ok["mem_source"].unique())) + ")")
    ax.set_ylabel("top-1 accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    ax.set_title("accuracy vs peak memory")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = out[col].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
    return out


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (values formatted by ``_fmt``)."""
    cells = _fmt(df).astype(str)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(df: pd.DataFrame, title: str) -> str:
    front = pareto.front_table(df)
    summary = pareto.summary_by_config(df)
    counts = ", ".join(f"{k}: {v}" for k, v in pareto.status_counts(df).items())
    return (
        "\n\n".join(
            [
                f"# {title}",
                f"{len(df)} trials ({counts}).",
                "## Pareto front (accuracy max, peak memory min)",
                markdown_table(front) if not front.empty else "(no ok trial)",
                "## Every configuration (mean over seeds)",
                markdown_table(summary) if not summary.empty else "(no ok trial)",
                "![Pareto front](pareto.png)",
            ]
        )
        + "\n"
    )


def render_html(df: pd.DataFrame, title: str, png: bytes) -> str:
    front = pareto.front_table(df)
    summary = pareto.summary_by_config(df)
    not_ok = df[df["status"] != "ok"][
        ["trial_id", "backbone", "method", "checkpointing", "status", "error"]
    ]
    counts = ", ".join(f"{k}: {v}" for k, v in pareto.status_counts(df).items())
    img = base64.b64encode(png).decode("ascii")
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 7px;text-align:right}th{background:#f3f3f3}"
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{style}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{len(df)} trials ({html.escape(counts)}).</p>",
        f"<img alt='accuracy vs peak memory' src='data:image/png;base64,{img}'>",
        "<h2>Pareto front (accuracy max, peak memory min)</h2>",
        _fmt(front).to_html(index=False, border=0) if not front.empty else "<p>(no ok trial)</p>",
        "<h2>Every configuration (mean over seeds)</h2>",
        _fmt(summary).to_html(index=False, border=0) if not summary.empty else "<p>(none)</p>",
    ]
    if not not_ok.empty:
        not_ok = not_ok.assign(error=not_ok["error"].str.slice(0, 200))
        parts += ["<h2>Trials that did not finish ok</h2>", not_ok.to_html(index=False, border=0)]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(df: pd.DataFrame, store: RecordStore, title: str) -> ReportFiles:
    """Write the three report files next to the records; returns their paths."""
    png = pareto_plot(df)
    return ReportFiles(
        html=store.write_bytes("report.html", render_html(df, title, png).encode("utf-8")),
        png=store.write_bytes("pareto.png", png),
        markdown=store.write_bytes("report.md", render_markdown(df, title).encode("utf-8")),
    )
