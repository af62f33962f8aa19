"""The seed paper's kind of findings, computed from whatever a sweep recorded.

The paper states its results as comparisons: "QLoRA and BitFit cut energy by 20-30 % at
1-2 % accuracy" (each method against full fine-tuning), "adaptive checkpointing reduces
peak memory by 43-79 % with 9-30 % energy overhead" (each strategy against none),
"DINOv2 surpasses fine-tuned models (0.917 vs 0.897)" (the best training-free baseline
against the best fine-tuned configuration). ``findings`` makes such statements from the
records that exist, per dataset, over seed means, each with the trials it rests on and
what weakens it (one seed, a change inside one standard deviation, estimated energy).
A statement the sweep lacks the trials for is omitted, with the reason.

Pure functions over the collected records table: no I/O.

Example:
    >>> for line in findings(store.collect()).lines():
    ...     print(line)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import pareto
from orchestrator.report.analysis import STEADY_STATE, energy_note, steady_state

log = logging.getLogger(__name__)

TOPICS: dict[str, str] = {
    "methods": "Methods against full fine-tuning",
    "checkpointing": "Checkpointing against none",
    "budget": "What fits the budget",
    "baselines": "Training-free baselines against fine-tuning",
}
# Cost column -> its name in a statement, in the order a statement gives them.
METHOD_COSTS = (
    ("energy_j", "energy"),
    ("peak_mem_mb", "peak memory"),
    ("train_time_s", "train time"),
)
CHECKPOINT_COSTS = (
    ("peak_mem_mb", "peak memory"),
    ("energy_j", "energy"),
    ("train_time_s", "train time"),
    # steady state (analysis.steady_state): set-up such as block profiling left out
    ("step_time_s", "time per step"),
    ("step_energy_j", "energy per step"),
)
NOT_FITTING = ("oom", "over_budget")
NAMED = 12  # configurations a budget statement names; past it they are counted
DETAILS_SHOWN = 100  # comparisons written out under a statement; past it they are counted
Row = Mapping[str, Any]


@dataclass(frozen=True)
class Finding:
    """One statement about one dataset: its text, the trials it rests on, what weakens it,
    and one line per comparison it summarises."""

    topic: str
    dataset: str
    text: str
    trials: tuple[str, ...]
    caveats: tuple[str, ...] = ()
    details: tuple[str, ...] = ()

    def line(self) -> str:
        return "; ".join([f"{self.dataset}: {self.text}", *self.caveats])

    def shown_details(self, limit: int = DETAILS_SHOWN) -> list[str]:
        """The first ``limit`` comparisons, then how many more there are."""
        more = len(self.details) - limit
        return [*self.details[:limit], *([f"… and {more} more comparisons"] if more > 0 else [])]

    def trial_list(self, limit: int = 60) -> str:
        """The trial ids, comma-separated; past ``limit`` the rest are counted."""
        more = len(self.trials) - limit
        return ", ".join(self.trials[:limit]) + (f", … and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class Omission:
    """A statement the sweep cannot make, and why."""

    topic: str
    dataset: str
    why: str

    def line(self) -> str:
        return f"{self.dataset}: {self.why}"


@dataclass(frozen=True)
class Findings:
    found: tuple[Finding, ...]
    omitted: tuple[Omission, ...]

    def lines(self) -> list[str]:
        """Every statement, then every omission, one line each (the command line's form)."""
        lines = [f"{TOPICS[f.topic]}: {f.line()}" for f in self.found]
        return lines + [f"not stated ({TOPICS[o.topic]}): {o.line()}" for o in self.omitted]

    def topic(self, topic: str) -> tuple[list[Finding], list[Omission]]:
        return (
            [f for f in self.found if f.topic == topic],
            [o for o in self.omitted if o.topic == topic],
        )


def findings(records: pd.DataFrame) -> Findings:
    """The statements every dataset of ``records`` supports, and those it does not."""
    configs = configurations(records)
    found: list[Finding] = []
    omitted: list[Omission] = []
    for dataset, rows in configs.groupby("dataset", sort=True):
        dataset = str(dataset)
        tuned = rows[rows["kind"] == "finetune"]
        for topic, made in (
            ("methods", _against(tuned, "method", "full", METHOD_COSTS, dataset)),
            ("checkpointing", _against(tuned, "checkpointing", "none", CHECKPOINT_COSTS, dataset)),
            ("budget", _budget(rows, dataset)),
            ("baselines", _baselines(rows, dataset)),
        ):
            for item in made:
                if isinstance(item, Finding):
                    found.append(item)
                else:
                    omitted.append(Omission(topic, dataset, item))
    return Findings(tuple(found), tuple(omitted))


# ---------------------------------------------------------------- configurations


def configurations(records: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (every trial, ok or not): ``trial_ids`` (all),
    ``ok_ids``, ``statuses`` (status -> count), and the seed means and stds of its ok trials."""
    keys = [c for c in pareto.CONFIG_COLUMNS if c in records]
    records = records.assign(**{k: records[k].fillna("") for k in keys if k != "budget_mb"})
    variants = pareto.variant_columns(records)
    keys += variants
    if "kind" not in records:
        records = records.assign(kind="finetune")
        keys = ["kind", *keys]
    groups = records.groupby(keys, dropna=False, sort=True)
    index = groups.size().index  # one entry per configuration, in group-number order
    ids, statuses, ok_ids = _members(groups.ngroup(), records, len(index))
    table = pd.DataFrame({"trial_ids": ids, "statuses": statuses, "ok_ids": ok_ids}, index=index)
    ok = records[records["status"] == "ok"]
    table = table.reset_index()
    labels = [pareto.config_label(r, variants) for r in table.to_dict("records")]
    table.insert(len(keys), "config", labels)
    means = pareto.aggregate_seeds(steady_state(ok), extra=STEADY_STATE, keys=keys)
    means = means.drop(columns=["config", "trials"], errors="ignore")
    table = table.merge(means, on=keys, how="left")
    table["energy_note"] = [energy_note(r) for r in table.to_dict("records")]
    return table


def _members(
    group: pd.Series, records: pd.DataFrame, count: int
) -> tuple[list[tuple], list[dict], list[tuple]]:
    """Per group number: its trial ids (sorted), status counts and ok trial ids, in one
    pass over the records (not a Python function per group: 10^4 configurations)."""
    ids = records["trial_id"].astype(str).to_numpy()
    status = records["status"].to_numpy()
    codes = group.to_numpy()
    every: list[list[str]] = [[] for _ in range(count)]
    ok: list[list[str]] = [[] for _ in range(count)]
    counts: list[dict[str, int]] = [{} for _ in range(count)]
    for i in np.lexsort((ids, codes)):
        c, s = codes[i], status[i]
        every[c].append(ids[i])
        counts[c][s] = counts[c].get(s, 0) + 1
        if s == "ok":
            ok[c].append(ids[i])
    return [tuple(x) for x in every], counts, [tuple(x) for x in ok]


# ---------------------------------------------------------------- one factor against a reference


def _against(
    tuned: pd.DataFrame,
    factor: str,
    reference: str,
    costs: Sequence[tuple[str, str]],
    dataset: str,
) -> list[Finding | str]:
    """Each value of ``factor`` against ``reference`` on configurations equal in the rest."""
    shared = [c for c in ("backbone", "method", "checkpointing", "budget_mb") if c != factor]
    what = f"{', '.join(shared[:-1])} and budget"
    # the other varying arguments too (the learning rate; not the factor's own arguments)
    shared += [c for c in pareto.variant_columns(tuned) if not c.startswith(f"{factor}.")]
    ok = tuned[[len(ids) > 0 for ids in tuned["ok_ids"]]] if len(tuned) else tuned
    if ok.empty:
        return ["no fine-tuning trial finished ok"]
    refs = {_key(r, shared): r for r in ok[ok[factor] == reference].to_dict("records")}
    if not refs:
        return [f"no {factor} {reference} trial finished ok: {factor}s are compared with it"]
    others = sorted(set(tuned[factor]) - {reference})
    if not others:
        return [f"only {factor} {reference} ran: nothing to compare with it"]
    out: list[Finding | str] = []
    for value in others:
        rows = ok[ok[factor] == value].to_dict("records")
        pairs = [(r, refs[_key(r, shared)]) for r in rows if _key(r, shared) in refs]
        if pairs:
            out.append(_compared(value, reference, pairs, costs, dataset, factor, what))
        elif not rows:
            out.append(f"{value}: no trial finished ok")
        else:
            out.append(f"{value}: no ok configuration shares {what} with an ok {reference} one")
    return out


def _key(row: Row, columns: Sequence[str]) -> tuple:
    return tuple(None if pd.isna(row[c]) else row[c] for c in columns)


def _compared(
    value: str,
    reference: str,
    pairs: list[tuple[Row, Row]],
    costs: Sequence[tuple[str, str]],
    dataset: str,
    factor: str,
    what: str,
) -> Finding:
    parts = []
    for column, name in costs:
        changes = [_relative(a.get(column), b.get(column)) for a, b in pairs]
        known = [c for c in changes if c is not None]
        if known:
            parts.append(f"{name} {percent_range(known)} %")
    deltas = [a["accuracy"] - b["accuracy"] for a, b in pairs]
    if any(_finite(d) for d in deltas):
        parts.append(f"accuracy {points_range([d for d in deltas if _finite(d)])} points")
    n = len(pairs)
    trials = tuple(sorted({t for a, b in pairs for t in (*a["ok_ids"], *b["ok_ids"])}))
    text = (
        f"{value} vs {reference}: {', '.join(parts)}, over {n} pair{'s' * (n > 1)} "
        f"of the same {what} ({len(trials)} trials)"
    )
    details = tuple(_pair_line(a, b, costs, factor) for a, b in pairs)
    return Finding(_topic(factor), dataset, text, trials, _caveats(pairs), details)


def _topic(factor: str) -> str:
    return "methods" if factor == "method" else "checkpointing"


def _pair_line(a: Row, b: Row, costs: Sequence[tuple[str, str]], factor: str) -> str:
    """One comparison in full: what it shares, each cost's change, both accuracies."""
    shared = [c for c in a if "." in str(c) and not str(c).startswith(f"{factor}.")]
    label = pareto.config_label({**a, factor: f"{a[factor]} vs {b[factor]}"}, shared)
    parts = [
        f"{name} {percent(c)} %"
        for column, name in costs
        if (c := _relative(a.get(column), b.get(column))) is not None
    ]
    accuracy = f"accuracy {mean_std(a, 'accuracy')} vs {mean_std(b, 'accuracy')}"
    accuracy += f" ({points(a['accuracy'] - b['accuracy'])} points)"
    return f"{label}: {', '.join([*parts, accuracy])}"


def _relative(value: Any, reference: Any) -> float | None:
    """``value / reference - 1``; None when either is missing or the reference is not > 0."""
    if not _finite(value) or not _finite(reference) or float(reference) <= 0:
        return None
    return float(value) / float(reference) - 1.0


def _finite(value: Any) -> bool:
    return value is not None and not pd.isna(value) and math.isfinite(float(value))


def _caveats(pairs: list[tuple[Row, Row]]) -> tuple[str, ...]:
    """What keeps the accuracy change (or the energy) from being read at face value."""
    n, out = len(pairs), []
    single = sum(min(a["seeds"], b["seeds"]) < 2 for a, b in pairs)
    noisy = sum(
        min(a["seeds"], b["seeds"]) >= 2
        and abs(a["accuracy"] - b["accuracy"]) <= max(a["accuracy_std"], b["accuracy_std"])
        for a, b in pairs
    )
    if single:
        have = "has" if single == 1 else "have"
        out.append(
            f"{_count(single, n)} {have} one seed: the accuracy change cannot be told from "
            "seed noise"
        )
    if noisy:
        out.append(
            f"the accuracy change is inside one seed standard deviation in {_count(noisy, n)}"
        )
    notes = {n for a, b in pairs for row in (a, b) for n in row["energy_note"].split(", ") if n}
    if "estimated" in notes:
        out.append("energy estimated from CPU time, not measured")
    if "share" in notes:
        out.append("energy a share of a shared GPU")
    return tuple(out)


def _count(k: int, n: int) -> str:
    """``the pair``, ``all 3 pairs`` or ``1 of 3 pairs``."""
    if k == n:
        return "the pair" if n == 1 else f"all {n} pairs"
    return f"{k} of {n} pairs"


# ---------------------------------------------------------------- budget


def _budget(rows: pd.DataFrame, dataset: str) -> list[Finding | str]:
    """Per budget: the configurations that fit, and those that ran out of it."""
    out: list[Finding | str] = []
    for budget, group in rows.groupby("budget_mb", dropna=False, sort=True):
        records = group.to_dict("records")
        fit = [r for r in records if set(r["statuses"]) == {"ok"}]
        over = [r for r in records if set(r["statuses"]) & set(NOT_FITTING)]
        other = [r for r in records if set(r["statuses"]) - {"ok"} - set(NOT_FITTING)]
        other = [r for r in other if not set(r["statuses"]) & set(NOT_FITTING)]
        where = f"the {budget:g} MiB budget" if _finite(budget) else "their budget"
        text = f"{len(fit)} of {len(records)} configurations fit {where} (every trial ok)"
        if over:
            text += f"; over it: {_named(over)}"
        if other:
            text += f"; ended otherwise: {_named(other)}"
        trials = tuple(sorted(t for r in records for t in r["trial_ids"]))
        out.append(Finding("budget", dataset, text, trials))
    return out


def _named(rows: list[Row], limit: int = NAMED) -> str:
    """``config (status n, ...)`` of each row, the first ``limit`` of them; the rest counted."""
    named = "; ".join(f"{r['config']} ({_counts(r)})" for r in rows[:limit])
    return named + (f"; and {len(rows) - limit} more" if len(rows) > limit else "")


def _counts(row: Row) -> str:
    return ", ".join(f"{status} {n}" for status, n in sorted(row["statuses"].items()))


# ---------------------------------------------------------------- baselines


def _baselines(rows: pd.DataFrame, dataset: str) -> list[Finding | str]:
    """The most accurate baseline against the most accurate fine-tuned configuration."""
    ok = rows[rows["ok_ids"].map(len).gt(0) & rows["accuracy"].notna()]
    base, tuned = ok[ok["kind"] == "baseline"], ok[ok["kind"] == "finetune"]
    if base.empty:
        return ["no training-free baseline finished ok"]
    if tuned.empty:
        return ["no fine-tuning trial finished ok to compare the baselines with"]
    b = base.loc[base["accuracy"].idxmax()].to_dict()
    t = tuned.loc[tuned["accuracy"].idxmax()].to_dict()
    delta = b["accuracy"] - t["accuracy"]
    text = (
        f"best baseline {b['config']} {mean_std(b, 'accuracy')} vs best fine-tuned "
        f"{t['config']} {mean_std(t, 'accuracy')}: {points(delta)} points"
    )
    costs = [
        f"{name} {percent(c)} %"
        for column, name in (("energy_j", "energy"), ("train_time_s", "train time"))
        if (c := _relative(b.get(column), t.get(column))) is not None
    ]
    if costs:
        text += f", {', '.join(costs)}"
    trials = tuple(sorted((*b["ok_ids"], *t["ok_ids"])))
    text += f" ({len(trials)} trials)"
    return [Finding("baselines", dataset, text, trials, _caveats([(b, t)]))]


# ---------------------------------------------------------------- numbers as text


def percent(change: float) -> str:
    """A relative change in per cent, signed: ``−25``, ``+9.5`` (whole numbers from 10)."""
    value = 100.0 * change
    text = f"{value:+.0f}" if abs(value) >= 9.95 else f"{value:+.1f}"
    return text.replace("-", "−")


def points(delta: float) -> str:
    """An accuracy change (fractions) in percentage points, signed, one decimal."""
    return f"{100.0 * delta:+.1f}".replace("-", "−")


def percent_range(changes: Sequence[float]) -> str:
    return _span([percent(c) for c in sorted(changes)])


def points_range(deltas: Sequence[float]) -> str:
    return _span([points(d) for d in sorted(deltas)])


def _span(texts: list[str]) -> str:
    """``lo to hi``, or one value when they read the same."""
    return texts[0] if texts[0] == texts[-1] else f"{texts[0]} to {texts[-1]}"


def mean_std(row: Row, column: str) -> str:
    """``0.917 ± 0.004`` (three decimals); the mean alone for one seed."""
    std = row.get(f"{column}_std")
    spread = f" ± {std:.3f}" if _finite(std) and row.get("seeds", 0) > 1 else ""
    return f"{row[column]:.3f}{spread}"
