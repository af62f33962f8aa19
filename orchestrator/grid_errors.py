"""Every error of a grid at once (``orchestrate validate`` and ``run``), not only the first.

``grid.parse_grid`` stops at the first error. Rather than thread a collector through each
of its checks, this module validates again around the errors it finds: a field in error is
probed entry by entry (each entry of a list or mapping validated alone: those that fail are
the errors; a section such as ``train`` is one config whose own check names all its
problems), then replaced by its good entries, a neutral value (a required field) or
nothing (an optional one), and the grid is validated again until it passes. A field that
refers to others (``exclude``, ``search``, ``deploy``) is not judged once a field it
refers to was replaced: its error could be the replacement's, so it is named as unchecked.

Example:
    >>> grid = validate_grid("grid/smoke.yaml")  # raises GridErrors listing every error
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from orchestrator import strict_yaml
from orchestrator.grid import MAX_TRIALS, Grid, GridError, load_grid, parse_grid

log = logging.getLogger(__name__)

# Valid values that replace a required field in error, so that the rest can be checked.
NEUTRAL = {
    "name": "grid",
    "output": "grid-output",
    "budget_mb": 2048,
    "seeds": [0],
    "datasets": {"digits": {}},
    "backbones": ["vit_test"],
    "methods": {"full": {}},
}
# Fields whose entries are independent of one another, so each can be validated alone
# (a section such as `train` is one config whose fields are checked together).
ENTRY_WISE = (
    "budget_mb",
    "seeds",
    "datasets",
    "backbones",
    "methods",
    "checkpointing",
    "baselines",
    "exclude",
    "plugins",
)
# Fields whose checks read other fields, and those fields (an error there after one of
# them was replaced could be the replacement's).
AXIS_FIELDS = ("budget_mb", "seeds", "datasets", "backbones", "methods", "checkpointing")
REFERS = {
    "exclude": AXIS_FIELDS,
    "deploy": (*AXIS_FIELDS, "train"),
    "search": (*AXIS_FIELDS, "train", "deploy"),
}
WHOLE_FILE = ("file", "grid")  # errors after which nothing else can be checked
MAX_ROUNDS = 100


class GridErrors(GridError):
    """Every error found in one grid, one ``file: field: message`` line each."""

    def __init__(self, errors: list[GridError], unchecked: list[str]) -> None:
        ValueError.__init__(self, "\n".join(str(e) for e in errors))
        self.source, self.where = errors[0].source, errors[0].where
        self.errors = tuple(errors)
        self.unchecked = tuple(unchecked)

    def lines(self) -> list[str]:
        """One line per error, then the fields left unchecked, if any."""
        lines = [str(e) for e in self.errors]
        if self.unchecked:
            lines.append(
                f"{self.source}: {', '.join(self.unchecked)}: not checked (it refers to "
                "fields with errors above: validate again once they are fixed)"
            )
        return lines


def validate_grid(path: str | Path, max_trials: int | None = MAX_TRIALS) -> Grid:
    """``grid.load_grid``, raising ``GridErrors`` with every error the grid has."""
    try:
        return load_grid(path, max_trials)
    except GridError as first:
        if top_field(first.where) in WHOLE_FILE:
            raise
        try:  # it read as YAML a moment ago; a file changed since keeps the first error
            raw = strict_yaml.load(Path(path).read_text("utf-8"))
        except Exception:  # noqa: BLE001 - the first error is still the right one to show
            raise first from None
        if not isinstance(raw, dict):
            raise
        errors, unchecked = every_error(raw, str(path), max_trials)
        raise GridErrors(errors or [first], unchecked) from None


def every_error(
    raw: dict[str, Any], source: str, max_trials: int | None = MAX_TRIALS
) -> tuple[list[GridError], list[str]]:
    """The errors of the grid mapping ``raw`` (at most one per field unless its entries
    fail alone) and the fields that could not be checked."""
    raw = dict(raw)
    errors: list[GridError] = []
    unchecked: list[str] = []
    replaced: dict[str, int] = {}  # field -> times replaced
    for _ in range(MAX_ROUNDS):
        try:
            parse_grid(raw, source, max_trials)
            break
        except GridError as exc:
            name = top_field(exc.where)
            if name in WHOLE_FILE or replaced.get(name, 0) >= 2:
                errors += [] if replaced.get(name) else [exc]
                break
            if replaced.get(name):  # its good entries fail together: the neutral value
                raw = _without(raw, name)
            elif set(REFERS.get(name, ())) & set(replaced):
                unchecked.append(name)
                raw = _without(raw, name)
            else:
                found, good = _probe(raw, name, source, max_trials)
                errors += [e for e in found or [exc] if str(e) not in map(str, errors)]
                raw = _with_entries(raw, name, good) if found and good else _without(raw, name)
            replaced[name] = replaced.get(name, 0) + 1
    return errors, unchecked


def top_field(where: str) -> str:
    """``train`` of ``train.epochs``, ``baselines`` of ``baselines[2]``."""
    match = re.match(r"[^.\[]+", where)
    return match.group(0) if match else where


def _entries(value: Any) -> list[Any]:
    """Each entry of a list or mapping as a value of the same kind, alone."""
    if isinstance(value, dict):
        return [{k: v} for k, v in value.items()]
    if isinstance(value, list):
        return [[v] for v in value]
    return []


def _probe(
    raw: dict[str, Any], name: str, source: str, max_trials: int | None
) -> tuple[list[GridError], list[Any]]:
    """The errors of the entries of field ``name`` validated alone, and the entries that
    pass alone (no errors when it has fewer than two entries: its error is the field's)."""
    entries = _entries(raw.get(name)) if name in ENTRY_WISE else []
    if len(entries) < 2:
        return [], []
    found, good = [], []
    for i, entry in enumerate(entries):
        error = _field_error({**raw, name: entry}, name, source, max_trials)
        if error is None:
            good.append(entry)
        else:
            found.append(_renumbered(error, name, i) if isinstance(entry, list) else error)
    return found, good


def _field_error(
    raw: dict[str, Any], name: str, source: str, max_trials: int | None
) -> GridError | None:
    """The error of field ``name`` in ``raw``, if validation stops at it."""
    try:
        parse_grid(raw, source, max_trials)
    except GridError as exc:
        return exc if top_field(exc.where) == name else None
    return None


def _renumbered(error: GridError, name: str, index: int) -> GridError:
    """An entry probed alone is entry 0: its error names its place in the whole list."""
    prefix = f"{error.source}: {error.where}: "
    message = str(error)[len(prefix) :]
    where = error.where.replace(f"{name}[0]", f"{name}[{index}]", 1)
    return GridError(error.source, where, message.replace(f"{name}[0]", f"{name}[{index}]"))


def _with_entries(raw: dict[str, Any], name: str, entries: list[Any]) -> dict[str, Any]:
    """``raw`` with field ``name`` made of ``entries`` (each a one-entry list or mapping)."""
    if isinstance(entries[0], dict):
        return {**raw, name: {k: v for entry in entries for k, v in entry.items()}}
    return {**raw, name: [v for entry in entries for v in entry]}


def _without(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """``raw`` with field ``name`` at its neutral value (required) or left out."""
    rest = {k: v for k, v in raw.items() if k != name}
    return {**rest, name: NEUTRAL[name]} if name in NEUTRAL else rest
