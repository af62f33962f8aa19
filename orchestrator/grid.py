"""The grid file: YAML loaded safely and validated into a typed ``Grid`` before anything runs.

Every error names the file, the field and the offending value; a registry name that
does not exist lists the valid ones. Registry arguments are validated (and completed
with their defaults) by the component's own config dataclass in ``workers/``, which
is imported here at call time only: the control plane imports no torch at import.

Example:
    >>> grid = load_grid("grid/smoke.yaml")
    >>> grid.name
    'smoke'
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.spec import TrainConfig, is_int, is_number

log = logging.getLogger(__name__)

AXES = ("backbone", "method", "checkpointing", "dataset", "seed", "budget_mb")
TOP_LEVEL = (
    "name",
    "output",
    "budget_mb",
    "seeds",
    "datasets",
    "backbones",
    "methods",
    "checkpointing",
    "train",
    "exclude",
    "baselines",
    "resources",
    "energy",
    "search",
)
REQUIRED = ("name", "output", "budget_mb", "seeds", "datasets", "backbones", "methods")


class GridError(ValueError):
    """A grid that cannot run; the message names file, field and value."""

    def __init__(self, source: str, where: str, message: str) -> None:
        super().__init__(f"{source}: {where}: {message}")
        self.source, self.where = source, where


@dataclass(frozen=True)
class Resources:
    """How trials are scheduled (see ``orchestrator.tune_driver``)."""

    cpus_per_trial: int = 1  # also the trial's torch thread count
    # GPUs per trial: a number (0 on CPU-only machines; a fraction packs trials on a GPU)
    # or "auto": the largest 1/k such that k trials' budgets plus their CUDA contexts
    # (measured on a GPU node) fit in one GPU's memory; 0 where the cluster has no GPU
    gpus_per_trial: float | str = 0.0
    max_concurrent: int = 2  # trials running at once
    # a trial whose worker process or node dies is run again (from scratch) this many
    # times; a trial that fails inside (an exception, an OOM) is a record, not retried
    max_retries: int = 2

    def __post_init__(self) -> None:
        if not is_int(self.cpus_per_trial) or self.cpus_per_trial < 1:
            raise ValueError(f"cpus_per_trial must be an integer >= 1, got {self.cpus_per_trial!r}")
        gpus = self.gpus_per_trial
        if gpus != "auto" and (not is_number(gpus) or gpus < 0):
            raise ValueError(f"gpus_per_trial must be a number >= 0 or 'auto', got {gpus!r}")
        if gpus != "auto" and gpus > 1 and gpus != int(gpus):
            raise ValueError(f"gpus_per_trial above 1 must be whole, got {gpus!r}")
        if not is_int(self.max_concurrent) or self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be an integer >= 1, got {self.max_concurrent!r}")
        if not is_int(self.max_retries) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")


@dataclass(frozen=True)
class Component:
    """A registry name with its resolved arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Grid:
    """A validated grid: every axis non-empty, every name registered."""

    name: str
    output: str
    budgets_mb: tuple[float, ...]
    seeds: tuple[int, ...]
    datasets: tuple[Component, ...]
    backbones: tuple[Component, ...]
    methods: tuple[Component, ...]
    checkpointing: tuple[Component, ...]
    train: TrainConfig
    exclude: tuple[dict[str, tuple[Any, ...]], ...] = ()  # axis -> any of these values
    baselines: tuple[Component, ...] = ()
    resources: Resources = field(default_factory=Resources)
    energy: dict[str, Any] = field(default_factory=dict)  # workers.energy.EnergyConfig fields
    search: dict[str, Any] = field(default_factory=dict)
    source: str = "<grid>"


def load_grid(path: str | Path) -> Grid:
    """Read and validate the grid file at ``path``; raises ``GridError``."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise GridError(source, "file", f"cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise GridError(source, "file", f"not UTF-8 text (byte {exc.start})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GridError(source, "file", f"not valid YAML ({exc})") from None
    return parse_grid(raw, source)


def parse_grid(raw: Any, source: str = "<grid>") -> Grid:
    """Validate an already-parsed grid mapping."""
    from workers.backbones import BACKBONES
    from workers.baselines import BASELINES
    from workers.checkpointing import CHECKPOINTING
    from workers.datasets import DATASETS
    from workers.energy import EnergyConfig
    from workers.methods import METHODS

    def fail(where: str, message: str) -> GridError:
        return GridError(source, where, message)

    if not isinstance(raw, dict):
        raise fail("file", f"the grid must be a mapping of fields, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - set(TOP_LEVEL))
    if unknown:
        raise fail(
            unknown[0], f"unknown field {unknown[0]!r}; valid fields: {', '.join(TOP_LEVEL)}"
        )
    for key in REQUIRED:
        if key not in raw:
            raise fail(key, "required field is missing")

    name = raw["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise fail("name", f"must be a word of letters, digits, '_', '.', '-', got {name!r}")
    output = raw["output"]
    if not isinstance(output, str) or not output.strip():
        raise fail("output", f"must be a folder path or URI, got {output!r}")

    budgets = _as_list(raw["budget_mb"])
    if not budgets:
        raise fail("budget_mb", "must not be empty")
    for b in budgets:
        if not is_number(b) or b <= 0:
            raise fail("budget_mb", f"must be a number of MiB > 0 (or a list of them), got {b!r}")
    _no_duplicates(fail, "budget_mb", budgets)

    seeds = _as_list(raw["seeds"])
    if not seeds:
        raise fail("seeds", "must not be empty")
    for s in seeds:
        if not is_int(s) or s < 0:
            raise fail("seeds", f"must be integers >= 0, got {s!r}")
    _no_duplicates(fail, "seeds", seeds)

    datasets = _components(fail, "datasets", raw["datasets"], DATASETS)
    backbones = _components(fail, "backbones", raw["backbones"], BACKBONES)
    methods = _components(fail, "methods", raw["methods"], METHODS)
    checkpointing = _components(
        fail, "checkpointing", raw.get("checkpointing", ["none"]), CHECKPOINTING
    )

    train = _dataclass_from(fail, "train", TrainConfig, _or_empty(raw, "train", {}))
    resources = _dataclass_from(fail, "resources", Resources, _or_empty(raw, "resources", {}))
    energy = _dataclass_from(fail, "energy", EnergyConfig, _or_empty(raw, "energy", {}))

    baselines = _baselines(fail, _or_empty(raw, "baselines", []), BASELINES)
    search = _or_empty(raw, "search", {})
    if not isinstance(search, dict):
        raise fail("search", f"must be a mapping, got {search!r}")

    grid = Grid(
        name=name,
        output=output,
        budgets_mb=tuple(float(b) for b in budgets),
        seeds=tuple(seeds),
        datasets=datasets,
        backbones=backbones,
        methods=methods,
        checkpointing=checkpointing,
        train=train,
        baselines=baselines,
        resources=resources,
        energy=dataclasses.asdict(energy),
        search=search,
        source=source,
    )
    exclude = _exclusions(fail, _or_empty(raw, "exclude", []), grid)
    grid = dataclasses.replace(grid, exclude=exclude)
    _check_pairs(fail, grid)
    return grid


# ---------------------------------------------------------------- pieces


def _or_empty(raw: dict[str, Any], key: str, empty: Any) -> Any:
    """The field's value; an absent or null field is the empty default (and only those)."""
    value = raw.get(key)
    return empty if value is None else value


def _is_hashable_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _no_duplicates(fail: Any, where: str, values: list[Any]) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise fail(where, f"{v!r} appears twice")
        seen.add(v)


def _components(fail: Any, where: str, value: Any, registry: Any) -> tuple[Component, ...]:
    """A list of names, or a mapping name -> arguments, checked against ``registry``."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, str):
                raise fail(where, f"list entries must be registry names, got {item!r}")
        _no_duplicates(fail, where, value)
        items: list[tuple[str, Any]] = [(n, {}) for n in value]
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        raise fail(where, f"must be a list of names or a mapping name -> arguments, got {value!r}")
    if not items:
        raise fail(where, "must not be empty")
    out = []
    for name, args in items:
        if name not in registry:
            valid = ", ".join(registry.names()) or "(none registered yet)"
            raise fail(where, f"unknown {registry.kind} {name!r}; valid: {valid}")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise fail(f"{where}.{name}", f"arguments must be a mapping, got {args!r}")
        try:
            out.append(Component(name, registry.resolve_args(name, args)))
        except ValueError as exc:
            raise fail(f"{where}.{name}", str(exc)) from None
    return tuple(out)


def _dataclass_from(fail: Any, where: str, cls: type, value: Any) -> Any:
    if not isinstance(value, dict):
        raise fail(where, f"must be a mapping, got {value!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise fail(where, f"unknown field {unknown[0]!r}; valid: {', '.join(sorted(fields))}")
    value = dict(value)
    for f in dataclasses.fields(cls):  # YAML reads 1e-3 as a string: accept the intent
        default = f.default
        if isinstance(default, float) and isinstance(value.get(f.name), str):
            try:
                value[f.name] = float(value[f.name])
            except ValueError:
                pass
    try:
        return cls(**value)
    except (TypeError, ValueError) as exc:
        raise fail(where, str(exc)) from None


def _baselines(fail: Any, value: Any, registry: Any) -> tuple[Component, ...]:
    if not isinstance(value, list):
        raise fail("baselines", f"must be a list of {{name: ..., <arguments>}}, got {value!r}")
    out = []
    for i, item in enumerate(value):
        where = f"baselines[{i}]"
        if not isinstance(item, dict) or "name" not in item:
            raise fail(where, f"must be a mapping with a 'name', got {item!r}")
        args = {k: v for k, v in item.items() if k != "name"}
        name = item["name"]
        if name not in registry:
            valid = ", ".join(registry.names()) or "(none registered yet)"
            raise fail(where, f"unknown baseline {name!r}; valid: {valid}")
        try:
            out.append(Component(name, registry.resolve_args(name, args)))
        except ValueError as exc:
            raise fail(where, str(exc)) from None
    return tuple(out)


def _check_pairs(fail: Any, grid: Grid) -> None:
    """Every backbone x method pair that is not excluded must be one that can run."""
    from workers.methods import check_applicable

    for backbone in grid.backbones:
        for method in grid.methods:
            pair = {"backbone": backbone.name, "method": method.name}
            if any(
                set(rule) <= set(pair) and all(pair[k] in v for k, v in rule.items())
                for rule in grid.exclude
            ):
                continue
            try:
                check_applicable(method.name, backbone.name)
            except ValueError as exc:
                raise fail(
                    "methods",
                    f"{exc}; remove one of them or add "
                    f"{{backbone: {backbone.name}, method: {method.name}}} to exclude",
                ) from None


def _exclusions(fail: Any, value: Any, grid: Grid) -> tuple[dict[str, tuple[Any, ...]], ...]:
    """Each exclusion maps axes to one value or a list of values (any of them matches);
    every value must exist in the grid. Stored as axis -> tuple of values."""
    if not isinstance(value, list):
        raise fail("exclude", f"must be a list of partial specs, got {value!r}")
    present = {
        "backbone": {c.name for c in grid.backbones},
        "method": {c.name for c in grid.methods},
        "checkpointing": {c.name for c in grid.checkpointing},
        "dataset": {c.name for c in grid.datasets},
        "seed": set(grid.seeds),
        "budget_mb": set(grid.budgets_mb),
    }
    out = []
    for i, item in enumerate(value):
        where = f"exclude[{i}]"
        if not isinstance(item, dict) or not item:
            raise fail(where, f"must be a non-empty mapping of axis -> value, got {item!r}")
        rule = {}
        for axis, v in item.items():
            if axis not in AXES:
                raise fail(where, f"unknown axis {axis!r}; valid: {', '.join(AXES)}")
            values = v if isinstance(v, list) else [v]
            if not values or not all(_is_hashable_scalar(x) for x in values):
                raise fail(
                    f"{where}.{axis}", f"must be a value of the axis or a list of them, got {v!r}"
                )
            for x in values:
                if x not in present[axis]:
                    raise fail(
                        where,
                        f"{axis} {x!r} is not in the grid, so the exclusion would match nothing",
                    )
            rule[axis] = tuple(values)
        out.append(rule)
    return tuple(out)
