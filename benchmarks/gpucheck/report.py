"""The check's report: one JSON document (schema below, checked by ``validate``) and its
Markdown summary. Plain data, no torch: the check's own process renders it.

A *figure* is one measured number (or status) with its unit and its *source*: the
meter, counter or record field it was read from, so that nobody mistakes an accounted
figure for an allocator one. A figure may carry a *target* (``">= 4"``) and whether
it was met. A figure that could not be measured has no value and says why
(``skipped``), e.g. ``"skipped: no CUDA"`` on a CPU run.

    {"schema": SCHEMA, "device": "cuda" | "cpu", "tiny": bool, "started_at", "ended_at",
     "wall_s", "budget_s", "command", "provenance": {...}, "environment": {...},
     "plan": [{"part", "title", "estimate_s", "limit_s"}],
     "parts": {name: {"status", "reason", "wall_s", "limit_s", "figures": [figure],
                      "notes": [str], "log_tail": [str]}},
     "summary": {"parts_ok", "figures", "targets_met", "targets_missed", "skipped"}}
    figure: {"name", "value", "unit", "source", "target", "met", "skipped"}
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from typing import Any

SCHEMA = "vramsweep.gpu_check/1"
# ok: the part ran to its end (its targets may still be missed); failed: it raised;
# timeout: killed at its limit; crashed: its process died; skipped: not run (why in reason)
STATUSES = ("ok", "failed", "timeout", "crashed", "skipped")
NO_CUDA = "skipped: no CUDA"
TOP_KEYS = (
    "schema", "device", "tiny", "started_at", "ended_at", "wall_s", "budget_s", "command",
    "provenance", "environment", "plan", "parts", "summary",
)  # fmt: skip
FIGURE_KEYS = ("name", "value", "unit", "source", "target", "met", "skipped")

_OPS = {
    "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq,
}  # fmt: skip


@dataclass(frozen=True)
class Target:
    """What a figure should be: ``Target(">=", 4)`` reads ">= 4"."""

    op: str
    value: float | int | str | bool

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"target op must be one of {list(_OPS)}, got {self.op!r}")

    def met(self, value: Any) -> bool:
        return bool(_OPS[self.op](value, self.value))

    def __str__(self) -> str:
        return f"{self.op} {self.value}"


@dataclass(frozen=True)
class Figure:
    """One measured figure; ``value`` None exactly when ``skipped`` says why."""

    name: str
    value: float | int | str | bool | None
    unit: str
    source: str
    target: str | None = None
    met: bool | None = None
    skipped: str | None = None

    @classmethod
    def of(
        cls, name: str, value: Any, unit: str, source: str, target: Target | None = None
    ) -> Figure:
        value = _plain(value)
        met = None if target is None else target.met(value)
        return cls(name, value, unit, source, None if target is None else str(target), met)

    @classmethod
    def skip(cls, name: str, reason: str, unit: str = "", source: str = "") -> Figure:
        reason = reason if reason.startswith("skipped") else f"skipped: {reason}"
        return cls(name, None, unit, source or "not measured", skipped=reason)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _plain(value: Any) -> float | int | str | bool:
    """A JSON scalar: floats to 6 significant digits; numpy / torch scalars unwrapped."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return float(f"{value:.6g}")
    raise TypeError(f"a figure's value must be a scalar, got {type(value).__name__}")


# ---------------------------------------------------------------- schema


def validate(doc: dict[str, Any]) -> list[str]:
    """Problems of ``doc`` against the schema (empty: valid). Every planned part must be
    present with figures, or with the reason it has none."""
    problems = [f"missing key {k!r}" for k in TOP_KEYS if k not in doc]
    if problems:
        return problems
    if doc["schema"] != SCHEMA:
        problems.append(f"schema is {doc['schema']!r}, not {SCHEMA!r}")
    planned = [p["part"] for p in doc["plan"]]
    for name in planned:
        part = doc["parts"].get(name)
        if part is None:
            problems.append(f"part {name}: missing")
            continue
        problems += [f"part {name}: {p}" for p in _part_problems(part)]
    extra = sorted(set(doc["parts"]) - set(planned))
    problems += [f"part {name}: not in the plan" for name in extra]
    return problems


def _part_problems(part: dict[str, Any]) -> list[str]:
    problems = []
    if part.get("status") not in STATUSES:
        problems.append(f"status {part.get('status')!r} is not one of {list(STATUSES)}")
    figures = part.get("figures")
    if not isinstance(figures, list):
        return [*problems, "figures is not a list"]
    if part.get("status") == "ok" and not figures:
        problems.append("ok but no figures")
    if part.get("status") != "ok" and not part.get("reason"):
        problems.append(f"status {part.get('status')!r} without a reason")
    names = [f.get("name") for f in figures]
    problems += [
        f"figure {n!r} appears twice" for n in sorted({n for n in names if names.count(n) > 1})
    ]
    for figure in figures:
        problems += [f"figure {figure.get('name')!r}: {p}" for p in _figure_problems(figure)]
    return problems


def _figure_problems(f: dict[str, Any]) -> list[str]:
    problems = [f"missing key {k!r}" for k in FIGURE_KEYS if k not in f]
    if problems:
        return problems
    if not isinstance(f["name"], str) or not f["name"]:
        problems.append("no name")
    if not isinstance(f["source"], str) or not f["source"]:
        problems.append("no source")
    if not isinstance(f["unit"], str):
        problems.append("unit is not a string")
    if f["value"] is None:
        if not (isinstance(f["skipped"], str) and f["skipped"].startswith("skipped")):
            problems.append("no value and no 'skipped: ...' reason")
    elif not isinstance(f["value"], bool | int | float | str):
        problems.append(f"value {f['value']!r} is not a scalar")
    elif f["skipped"] is not None:
        problems.append("a value and a skip reason")
    if f["met"] not in (True, False, None):
        problems.append(f"met is {f['met']!r}")
    if f["met"] is not None and not f["target"]:
        problems.append("met without a target")
    return problems


def summarise(parts: dict[str, dict[str, Any]]) -> dict[str, int]:
    figures = [f for p in parts.values() for f in p["figures"]]
    return {
        "parts_ok": sum(p["status"] == "ok" for p in parts.values()),
        "figures": len(figures),
        "targets_met": sum(f["met"] is True for f in figures),
        "targets_missed": sum(f["met"] is False for f in figures),
        "skipped": sum(f["value"] is None for f in figures),
    }


# ---------------------------------------------------------------- Markdown


def markdown(doc: dict[str, Any]) -> str:
    """Every figure of ``doc`` as Markdown tables, one per part, with its source."""
    env = doc["environment"]
    mode = "CPU, tiny backbones" if doc["device"] == "cpu" else "CUDA, real backbone sizes"
    lines = [
        f"# GPU acceptance check: {env.get('device_name', 'device not reported')}",
        "",
        f"- mode: {mode}; started {doc['started_at']}; wall time {doc['wall_s']:.0f} s "
        f"(budget {doc['budget_s']:.0f} s)",
        f"- git {doc['provenance'].get('git_sha', '?')}; torch {env.get('torch', '?')}, "
        f"CUDA {env.get('cuda') or '-'}; command `{doc['command']}`",
        f"- {_summary_line(doc['summary'])}",
        "",
        "| part | status | time (s) | limit (s) | targets met | missed |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for plan in doc["plan"]:
        part = doc["parts"][plan["part"]]
        met = sum(f["met"] is True for f in part["figures"])
        missed = sum(f["met"] is False for f in part["figures"])
        lines.append(
            f"| {plan['part']} | {part['status']} | {part['wall_s']:.1f} | {part['limit_s']:.0f}"
            f" | {met} | {missed} |"
        )
    for plan in doc["plan"]:
        lines += ["", *_part_section(plan, doc["parts"][plan["part"]])]
    return "\n".join(lines) + "\n"


def _summary_line(s: dict[str, int]) -> str:
    return (
        f"{s['parts_ok']} parts ok; {s['figures']} figures, {s['targets_met']} targets met, "
        f"{s['targets_missed']} missed, {s['skipped']} skipped"
    )


def _part_section(plan: dict[str, Any], part: dict[str, Any]) -> list[str]:
    lines = [f"## {plan['part']}: {plan['title']}", ""]
    if part["status"] != "ok":
        lines += [f"**{part['status']}**: {_one_line(part['reason'])}", ""]
    lines += [f"- {note}" for note in part["notes"]]
    if part["notes"]:
        lines.append("")
    if part["figures"]:
        lines += ["| figure | value | unit | target | met | source |", "|---|---:|---|---|---|---|"]
        lines += [_row(f) for f in part["figures"]]
    return lines


def _row(f: dict[str, Any]) -> str:
    value = f["skipped"] if f["value"] is None else f["value"]
    met = {True: "yes", False: "**no**", None: ""}[f["met"]]
    cells = (f["name"], value, f["unit"], f["target"] or "", met, f["source"])
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _one_line(text: str) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    return _cell(lines[-1] if lines else "")
