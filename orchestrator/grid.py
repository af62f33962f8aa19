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
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator import strict_yaml
from orchestrator.netscore import VARIANTS
from orchestrator.outputs import output_problem
from orchestrator.spec import TrainConfig, is_int, is_number

if TYPE_CHECKING:
    from orchestrator.scheduler import Scheduler

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
    "deploy",
    "plugins",
    "scheduler",
    "tracking",
)
REQUIRED = ("name", "output", "budget_mb", "seeds", "datasets", "backbones", "methods")

# Bounds of the grid's own values. Trials a grid may expand to (the product of its axes,
# exclusions not subtracted; `orchestrate run/validate --max-trials N` overrides it).
MAX_TRIALS = 1_000_000
MAX_NAME = 100  # characters of the grid's name (a folder and report title)
MAX_BUDGET_MB = 10_000_000  # 10 TiB: far above any device, far below float trouble
MAX_SEED = (1 << 32) - 1  # numpy's seed range (np.random.seed in every trial)
MAX_SHOWN = 200  # characters of a value quoted in an error message
MAX_MESSAGE = 2000  # characters of a whole error message


class GridError(ValueError):
    """A grid that cannot run; the message names file, field and value (each shortened:
    a hostile 5 MB value is never echoed whole)."""

    shown = False  # whether the command has shown it to the user already

    def __init__(self, source: str, where: str, message: str) -> None:
        where = shorten(where, MAX_SHOWN)
        super().__init__(f"{source}: {where}: {shorten(message, MAX_MESSAGE)}")
        self.source, self.where = source, where


def shorten(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, at most ``MAX_SHOWN`` characters."""
    if isinstance(value, str | bytes) and len(value) > MAX_SHOWN:
        value = value[: MAX_SHOWN + 1]  # no repr of a 5 MB string just to cut it
    return shorten(repr(value), MAX_SHOWN)


# Sane bounds of the scheduling values (the largest nodes and clusters, with room).
MAX_CPUS = 1024
MAX_GPUS = 64
MAX_CONCURRENT = 100_000
MAX_RETRIES = 100
MIN_STORE_MB, MAX_STORE_MB = 80, 1e7  # Ray refuses an object store under 75 MiB


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
    # MiB of a local Ray's object store (what the sweep shares: its decoded datasets); the
    # node's `memory` resource, which CPU trials reserve, is its available memory less
    # this. 0: Ray's default, 30 % of the available memory. Not used when joining a cluster
    object_store_mb: float = 0

    def __post_init__(self) -> None:
        store = self.object_store_mb
        if not is_number(store) or not (store == 0 or MIN_STORE_MB <= store <= MAX_STORE_MB):
            raise ValueError(
                f"object_store_mb must be 0 (Ray's default) or a number in [{MIN_STORE_MB}, "
                f"{MAX_STORE_MB:g}], got {store!r}"
            )
        for name, least, most in (
            ("cpus_per_trial", 1, MAX_CPUS),
            ("max_concurrent", 1, MAX_CONCURRENT),
            ("max_retries", 0, MAX_RETRIES),
        ):
            value = getattr(self, name)
            if not is_int(value) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
            if value > most:
                raise ValueError(f"{name} must be at most {most}, got {value!r}")
        gpus = self.gpus_per_trial
        if gpus != "auto" and (not is_number(gpus) or not 0 <= gpus <= MAX_GPUS):
            raise ValueError(
                f"gpus_per_trial must be a number in [0, {MAX_GPUS}] or 'auto', got {gpus!r}"
            )
        if gpus != "auto" and gpus > 1 and gpus != int(gpus):
            raise ValueError(f"gpus_per_trial above 1 must be whole, got {gpus!r}")


@dataclass(frozen=True)
class Component:
    """A registry name with its resolved arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- the search section

# What a search may optimise: a record column and its direction (NetScore variants are
# computed from the record by ``orchestrator.netscore``, in dB, higher is better).
SEARCH_OBJECTIVES: dict[str, str] = {
    "accuracy": "max",
    "peak_mem_mb": "min",
    "energy_j": "min",
    "train_time_s": "min",
    **{name: "max" for name in VARIANTS},
}
# Hard limits a feasible trial keeps, besides peak memory <= the search's budget_mb.
SEARCH_LIMITS = ("energy_j", "train_time_s")
SAMPLERS = ("tpe", "nsgaii", "gp", "random")
PRUNERS = ("none", "median")


@dataclass(frozen=True)
class Dimension:
    """One searched value: a list of ``choices``, or the interval ``low..high``.

    An interval is of integers when its bounds (and step) are integers and the field it
    fills is an integer; ``log`` samples it on a log scale; ``step`` quantises it.
    """

    name: str  # the field it fills: a TrainConfig field or a method argument
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False


@dataclass(frozen=True)
class Pruner:
    """Early stopping of hopeless trials on their per-epoch validation accuracy."""

    kind: str = "none"  # none | median (Optuna's median stopping rule)
    startup_trials: int = 5  # trials that finish before any is pruned
    warmup_epochs: int = 1  # epochs every trial completes; it can be stopped after the next

    def __post_init__(self) -> None:
        if self.kind not in PRUNERS:
            raise ValueError(f"kind must be one of {list(PRUNERS)}, got {self.kind!r}")
        if not is_int(self.startup_trials) or self.startup_trials < 0:
            raise ValueError(f"startup_trials must be an integer >= 0, got {self.startup_trials!r}")
        if not is_int(self.warmup_epochs) or self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {self.warmup_epochs!r}")


@dataclass(frozen=True)
class Search:
    """The validated ``search:`` section: what ``orchestrate search`` optimises, under which
    hard limits, over which space, for how long, with which Optuna sampler.

    The categorical axes are the grid's own (backbones, methods, checkpointing, datasets:
    an axis with one entry is fixed); ``train`` and ``method_args`` add the searched
    hyper-parameters. Every searched trial uses the grid's first seed and ``budget_mb``.
    """

    objectives: tuple[str, ...] = ("accuracy",)
    budget_mb: float = 0.0  # peak memory limit of every trial (the grid's budget by default)
    limits: dict[str, float] = field(default_factory=dict)  # energy_j / train_time_s -> max
    train: tuple[Dimension, ...] = ()
    method_args: dict[str, tuple[Dimension, ...]] = field(default_factory=dict)
    trials: int = 50  # trials of the study in all (a resumed search runs the rest)
    timeout_s: float | None = None  # no new trial starts after this long (per invocation)
    sampler: str = "tpe"
    seed: int = 0  # the sampler's seed
    startup_trials: int = 10  # random trials before the model (TPE, GP); NSGA-II's population
    n_parallel: int = 2  # trials in flight at once (default: resources.max_concurrent)
    storage: str = ""  # Optuna storage URL; "" = SQLite file search.db in the output folder
    study: str = ""  # Optuna study name; "" = the grid's name
    pruner: Pruner = field(default_factory=Pruner)

    def __post_init__(self) -> None:
        problems = []
        if not is_int(self.trials) or self.trials < 1:
            problems.append(f"trials must be an integer >= 1, got {self.trials!r}")
        elif self.trials > MAX_TRIALS:
            problems.append(f"trials must be at most {MAX_TRIALS}, got {self.trials!r}")
        timeout = self.timeout_s
        if timeout is not None and (not is_number(timeout) or timeout <= 0):
            problems.append(f"timeout_s must be a number of seconds > 0, got {timeout!r}")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        if not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            problems.append(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        least = 2 if self.sampler == "nsgaii" else 0  # a population of one cannot breed
        if not is_int(self.startup_trials) or not least <= self.startup_trials <= MAX_TRIALS:
            problems.append(
                f"startup_trials must be an integer in [{least}, {MAX_TRIALS}], "
                f"got {self.startup_trials!r}"
            )
        if not is_int(self.n_parallel) or not 1 <= self.n_parallel <= MAX_CONCURRENT:
            problems.append(
                f"n_parallel must be an integer in [1, {MAX_CONCURRENT}], got {self.n_parallel!r}"
            )
        if not isinstance(self.storage, str) or (self.storage and "://" not in self.storage):
            problems.append(
                "storage must be an SQLAlchemy URL (sqlite:///search.db, "
                f"postgresql://user@host/db), got {self.storage!r}"
            )
        if not isinstance(self.study, str) or not self.study.strip():
            problems.append(f"study must be a non-empty name, got {self.study!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def directions(self) -> list[str]:
        """Optuna's direction of each objective."""
        return [
            "maximize" if SEARCH_OBJECTIVES[o] == "max" else "minimize" for o in self.objectives
        ]


# Fields of the section that are plain values of ``Search``.
SEARCH_SCALARS = (
    "trials",
    "timeout_s",
    "sampler",
    "seed",
    "startup_trials",
    "n_parallel",
    "storage",
    "study",
)
SEARCH_FIELDS = (
    "objectives",
    "constraints",
    "budget_mb",
    "space",
    "trials",
    "timeout_s",
    "sampler",
    "seed",
    "startup_trials",
    "n_parallel",
    "storage",
    "study",
    "pruner",
)


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
    search: Search | None = None  # the `search:` section, for `orchestrate search`
    deploy: dict[str, Any] = field(default_factory=dict)  # workers.deploy.DeployConfig, resolved
    # modules imported (here, and in every worker) before the registries are read: the
    # `plugins:` entries, a path entry as the name of the module it holds
    plugins: tuple[str, ...] = ()
    scheduler: Scheduler | None = None  # the `scheduler:` section, for `orchestrate run`
    tracking: dict[str, Any] = field(default_factory=dict)  # tracker name -> its config
    source: str = "<grid>"


def load_grid(path: str | Path, max_trials: int | None = MAX_TRIALS, build: bool = True) -> Grid:
    """Read and validate the grid file at ``path``; raises ``GridError``. A grid whose
    axes multiply to more than ``max_trials`` trials is refused (None: no limit).
    ``build=False`` leaves out the checks that build backbones (on the meta device,
    after importing timm and torchvision: seconds): their arguments and input sizes, the
    methods and checkpointing each can take."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(strict_yaml.MAX_BYTES + 1)  # /dev/zero is not read to the end
        if len(data) > strict_yaml.MAX_BYTES:
            raise GridError(source, "file", f"larger than {strict_yaml.MAX_BYTES} bytes")
        text = data.decode("utf-8")
    except OSError as exc:
        raise GridError(source, "file", f"cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise GridError(source, "file", f"not UTF-8 text (byte {exc.start})") from None
    try:
        raw = strict_yaml.load(text)
    except strict_yaml.YamlLimitError as exc:
        raise GridError(source, exc.where, str(exc)) from None
    except yaml.YAMLError as exc:
        where = " ".join(str(exc).replace('in "<unicode string>", ', "").split())  # one line
        raise GridError(source, "file", f"not valid YAML ({where})") from None
    return parse_grid(raw, source, max_trials, build)


def parse_grid(
    raw: Any, source: str = "<grid>", max_trials: int | None = MAX_TRIALS, build: bool = True
) -> Grid:
    """Validate an already-parsed grid mapping (see ``load_grid``)."""

    def fail(where: str, message: str) -> GridError:
        return GridError(source, where, message)

    if not isinstance(raw, dict):
        raise fail("file", f"the grid must be a mapping of fields, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - set(TOP_LEVEL))
    if unknown:
        raise fail(
            unknown[0], f"unknown field {shown(unknown[0])}; valid fields: {', '.join(TOP_LEVEL)}"
        )
    for key in REQUIRED:
        if key not in raw:
            raise fail(key, "required field is missing")
    if max_trials is not None:  # before anything is built: a count of the raw axes
        _check_count(fail, raw, max_trials)
    return _parse(fail, raw, source, build)


def _parse(fail: Any, raw: dict[str, Any], source: str, build: bool) -> Grid:
    # the grid's own values first: their errors come before torch is imported
    name = raw["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise fail("name", f"must be a word of letters, digits, '_', '.', '-', got {shown(name)}")
    if len(name) > MAX_NAME:
        raise fail("name", f"must be at most {MAX_NAME} characters, got {len(name)}: {shown(name)}")
    output = raw["output"]
    if not isinstance(output, str) or not output.strip():
        raise fail("output", f"must be a folder path or URI, got {shown(output)}")
    problem = output_problem(output)
    if problem:
        raise fail("output", f"{shown(output)} {problem}")

    budgets = _as_list(raw["budget_mb"])
    if not budgets:
        raise fail("budget_mb", "must not be empty")
    for b in budgets:
        if not is_number(b) or b <= 0:
            raise fail(
                "budget_mb", f"must be a number of MiB > 0 (or a list of them), got {shown(b)}"
            )
        if b > MAX_BUDGET_MB:
            raise fail("budget_mb", f"must be at most {MAX_BUDGET_MB} MiB, got {shown(b)}")
    _no_duplicates(fail, "budget_mb", budgets)

    seeds = _as_list(raw["seeds"])
    if not seeds:
        raise fail("seeds", "must not be empty")
    for s in seeds:
        if not is_int(s) or s < 0:
            raise fail("seeds", f"must be integers >= 0, got {shown(s)}")
        if s > MAX_SEED:
            raise fail("seeds", f"must be at most {MAX_SEED} (numpy's seed range), got {s}")
    _no_duplicates(fail, "seeds", seeds)

    from workers.backbones import BACKBONES
    from workers.baselines import BASELINES
    from workers.checkpointing import CHECKPOINTING
    from workers.data import DATASETS
    from workers.energy import EnergyConfig
    from workers.methods import METHODS

    plugins = _plugins(fail, _or_empty(raw, "plugins", []), source)  # they add registry names
    datasets = _components(fail, "datasets", raw["datasets"], DATASETS)
    _check_datasets(fail, datasets)
    backbones = _components(fail, "backbones", raw["backbones"], BACKBONES)
    if build:
        _check_backbones(fail, backbones)
    methods = _components(fail, "methods", raw["methods"], METHODS)
    checkpointing = _components(
        fail, "checkpointing", raw.get("checkpointing", ["none"]), CHECKPOINTING
    )

    train = _dataclass_from(fail, "train", TrainConfig, _or_empty(raw, "train", {}))
    resources = _dataclass_from(fail, "resources", Resources, _or_empty(raw, "resources", {}))
    energy = _dataclass_from(fail, "energy", EnergyConfig, _or_empty(raw, "energy", {}))

    baselines = _baselines(fail, _or_empty(raw, "baselines", []), BASELINES)

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
        plugins=plugins,
        source=source,
    )
    exclude = _exclusions(fail, _or_empty(raw, "exclude", []), grid)
    grid = dataclasses.replace(grid, exclude=exclude)
    if build:
        _check_pairs(fail, grid)
    if raw.get("deploy") is not None:
        grid = dataclasses.replace(grid, deploy=_deploy(fail, raw["deploy"], grid))
    if raw.get("search") is not None:  # after deploy: its objectives may need that phase
        grid = dataclasses.replace(grid, search=_search(fail, raw["search"], grid))
    if raw.get("scheduler") is not None:
        grid = dataclasses.replace(grid, scheduler=_scheduler(fail, raw["scheduler"]))
    if raw.get("tracking") is not None:
        grid = dataclasses.replace(grid, tracking=_tracking(fail, raw["tracking"], output))
    return grid


# ---------------------------------------------------------------- pieces


def _check_count(fail: Any, raw: dict[str, Any], max_trials: int) -> None:
    """Refuse a grid whose axes multiply to more than ``max_trials`` trials, counted on
    the raw fields (a scalar axis is one entry; exclusions are not subtracted)."""
    sizes = {
        "datasets": _length(raw.get("datasets")),
        "backbones": _length(raw.get("backbones")),
        "methods": _length(raw.get("methods")),
        "checkpointing": _length(raw.get("checkpointing", ["none"])),
        "budget_mb": _length(raw.get("budget_mb")),
        "seeds": _length(raw.get("seeds")),
    }
    product = 1
    for size in sizes.values():
        product *= size
    per_baseline = sizes["datasets"] * sizes["budget_mb"] * sizes["seeds"]
    baselines = raw.get("baselines")
    count = product + (len(baselines) if isinstance(baselines, list) else 0) * per_baseline
    if count > max_trials:
        axes = " x ".join(f"{k} {v}" for k, v in sizes.items())
        raise fail(
            "grid",
            f"{axes} (+ baselines) = {count:,} trials, over the limit of {max_trials:,}; "
            "split the grid, or raise the limit with --max-trials N",
        )


def _length(value: Any) -> int:
    """Entries of an axis as written: a list or mapping has its length, anything else
    one (a scalar axis, or a value whose error comes later)."""
    return len(value) if isinstance(value, list | dict) else 1


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
                raise fail(where, f"list entries must be registry names, got {shown(item)}")
        _no_duplicates(fail, where, value)
        items: list[tuple[str, Any]] = [(n, {}) for n in value]
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        raise fail(
            where, f"must be a list of names or a mapping name -> arguments, got {shown(value)}"
        )
    if not items:
        raise fail(where, "must not be empty")
    out = []
    for name, args in items:
        if name not in registry:
            raise fail(where, registry.unknown_message(name))
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise fail(f"{where}.{name}", f"arguments must be a mapping, got {shown(args)}")
        try:
            out.append(Component(name, registry.resolve_args(name, args)))
        except ValueError as exc:
            raise fail(f"{where}.{name}", str(exc)) from None
    return tuple(out)


def _check_datasets(fail: Any, datasets: tuple[Component, ...]) -> None:
    """Each dataset's files as far as they can be checked without decoding them (a
    folder exists, a class folder holds images, a column is there)."""
    from workers.data import SourceError, check_source

    for dataset in datasets:
        try:
            check_source(dataset.name, dataset.args)
        except SourceError as exc:
            raise fail(f"datasets.{dataset.name}.{exc.field}", str(exc)) from None
        except OSError as exc:  # a path the system refuses (a name too long, a loop)
            raise fail(f"datasets.{dataset.name}", f"a path cannot be used: {exc}") from None


def _dataclass_from(fail: Any, where: str, cls: type, value: Any) -> Any:
    from workers.registry import RegistryError, check_value

    if not isinstance(value, dict):
        raise fail(where, f"must be a mapping, got {shown(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(value) - set(fields)))
    if unknown:
        raise fail(where, f"unknown field {shown(unknown[0])}; valid: {', '.join(sorted(fields))}")
    value = dict(value)
    for key, item in value.items():
        floating = isinstance(fields[key].default, float)
        if floating and isinstance(item, str):
            item = value[key] = _float_or_same(item)  # YAML reads 1e-3 as a string
        try:
            check_value(key, item)  # NaN, infinities, ints past 64 bits, huge strings
        except RegistryError as exc:
            raise fail(f"{where}.{key}", str(exc)) from None
        if floating and is_int(item) and abs(item) > 2**53:  # kept an int: ids hold
            raise fail(
                f"{where}.{key}", f"must be a number a float64 column holds exactly, got {item}"
            )
    try:
        return cls(**value)
    except (TypeError, ValueError) as exc:
        raise fail(where, str(exc)) from None


def _baselines(fail: Any, value: Any, registry: Any) -> tuple[Component, ...]:
    if not isinstance(value, list):
        raise fail("baselines", f"must be a list of {{name: ..., <arguments>}}, got {shown(value)}")
    out = []
    for i, item in enumerate(value):
        where = f"baselines[{i}]"
        if not isinstance(item, dict) or "name" not in item:
            raise fail(where, f"must be a mapping with a 'name', got {shown(item)}")
        args = {k: v for k, v in item.items() if k != "name"}
        name = item["name"]
        if name not in registry:
            raise fail(where, registry.unknown_message(name))
        try:
            out.append(Component(name, registry.resolve_args(name, args)))
        except ValueError as exc:
            raise fail(where, str(exc)) from None
    return tuple(out)


def _plugins(fail: Any, value: Any, source: str) -> tuple[str, ...]:
    """Load the entry-point plug-ins, then import each module the grid names (a path is
    relative to the grid file); their module names (``workers.plugins``)."""
    from workers.plugins import PluginError, import_plugin, load_entry_points

    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise fail("plugins", f"must be a list of module names or paths, got {value!r}")
    try:
        load_entry_points()
    except PluginError as exc:
        raise fail("plugins", f"a plug-in installed in this environment fails: {exc}") from None
    base = Path(source).parent if source != "<grid>" else None
    names = []
    for i, entry in enumerate(value):
        try:
            names.append(import_plugin(entry, base))
        except PluginError as exc:
            raise fail(f"plugins[{i}]", str(exc)) from None
    _no_duplicates(fail, "plugins", names)
    return tuple(names)


def _check_backbones(fail: Any, backbones: tuple[Component, ...]) -> None:
    """Every backbone builds (on the meta device) and runs at its input size."""
    from workers.backbones import check_backbone

    for backbone in backbones:
        try:
            check_backbone(backbone.name, backbone.args)
        except ValueError as exc:
            raise fail(f"backbones.{backbone.name}", str(exc)) from None
        except OSError as exc:  # a pretrained path the system refuses (a name too long)
            raise fail(f"backbones.{backbone.name}.pretrained", f"cannot be used: {exc}") from None


def _check_pairs(fail: Any, grid: Grid) -> None:
    """Every backbone x method pair that is not excluded must be one that can run."""
    from workers.methods import check_applicable

    _check_chains(fail, grid)
    for backbone in grid.backbones:
        for method in grid.methods:
            pair = {"backbone": backbone.name, "method": method.name}
            if _excluded(pair, grid.exclude):
                continue
            try:
                check_applicable(method.name, backbone.name, method.args, backbone.args)
            except ValueError as exc:
                raise fail(
                    "methods",
                    f"{exc}; remove one of them or add "
                    f"{{backbone: {backbone.name}, method: {method.name}}} to exclude",
                ) from None


def _check_chains(fail: Any, grid: Grid) -> None:
    """A checkpointing strategy other than ``none`` needs a backbone with blocks."""
    from workers.backbones import check_backbone

    for backbone in grid.backbones:
        if check_backbone(backbone.name, backbone.args).blocks:
            continue
        for strategy in grid.checkpointing:
            pair = {"backbone": backbone.name, "checkpointing": strategy.name}
            if strategy.name == "none" or _excluded(pair, grid.exclude):
                continue
            raise fail(
                "checkpointing",
                f"{strategy.name!r} checkpoints a chain of blocks, and no block was found in "
                f"backbone {backbone.name!r}; add {{backbone: {backbone.name}, "
                f"checkpointing: {strategy.name}}} to exclude",
            )


def _excluded(partial: dict[str, Any], exclude: tuple[dict[str, tuple[Any, ...]], ...]) -> bool:
    return any(
        set(rule) <= set(partial) and all(partial[k] in v for k, v in rule.items())
        for rule in exclude
    )


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


# ---------------------------------------------------------------- the search section


def _search(fail: Any, raw: Any, grid: Grid) -> Search:
    """The ``search:`` section, checked against the grid whose space it searches."""
    if not isinstance(raw, dict):
        raise fail("search", f"must be a mapping of fields, got {raw!r}")
    unknown = sorted(set(map(str, raw)) - set(SEARCH_FIELDS))
    if unknown:
        raise fail(f"search.{unknown[0]}", f"unknown field; valid: {', '.join(SEARCH_FIELDS)}")

    objectives = _or_empty(raw, "objectives", ["accuracy"])
    objectives = [objectives] if isinstance(objectives, str) else objectives
    if not isinstance(objectives, list) or not objectives:
        raise fail("search.objectives", f"must be a non-empty list of names, got {objectives!r}")
    for name in objectives:
        if not isinstance(name, str) or name not in SEARCH_OBJECTIVES:
            raise fail(
                "search.objectives",
                f"unknown objective {name!r}; valid: {', '.join(SEARCH_OBJECTIVES)} "
                "(accuracy and NetScore variants are maximised, the costs minimised)",
            )
    _no_duplicates(fail, "search.objectives", objectives)
    deployed = [name for name in objectives if name.startswith("netscore_deploy")]
    if deployed and not grid.deploy:
        raise fail(
            "search.objectives",
            f"{deployed[0]} scores the deployment phase: add a deploy: section to the grid",
        )

    budget = raw.get("budget_mb")
    if budget is None:
        if len(grid.budgets_mb) != 1:
            raise fail(
                "search.budget_mb",
                f"the grid has budgets {list(grid.budgets_mb)}: say which one the search keeps",
            )
        budget = grid.budgets_mb[0]
    if not is_number(budget) or budget <= 0:
        raise fail("search.budget_mb", f"must be a number of MiB > 0, got {budget!r}")

    limits = _or_empty(raw, "constraints", {})
    if not isinstance(limits, dict):
        raise fail("search.constraints", f"must be a mapping name -> limit, got {limits!r}")
    for key, limit in list(limits.items()):
        where = f"search.constraints.{key}"
        if key == "peak_mem_mb":
            raise fail(where, "peak memory is always limited, by search.budget_mb")
        if key not in SEARCH_LIMITS:
            raise fail(where, f"unknown constraint; valid: {', '.join(SEARCH_LIMITS)}")
        limit = _float_or_same(limit)
        if not is_number(limit) or limit <= 0:
            raise fail(where, f"must be a number > 0 (the largest feasible value), got {limit!r}")
        limits[key] = float(limit)

    space = _or_empty(raw, "space", {})
    if not isinstance(space, dict):
        raise fail("search.space", f"must be a mapping with train and methods, got {space!r}")
    unknown = sorted(set(map(str, space)) - {"train", "methods"})
    if unknown:
        raise fail(f"search.space.{unknown[0]}", "unknown field; valid: train, methods")
    train = _train_dimensions(fail, _or_empty(space, "train", {}), grid.train)
    method_args = _method_dimensions(fail, _or_empty(space, "methods", {}), grid)

    pruner = _or_empty(raw, "pruner", "none")
    pruner = _dataclass_from(
        fail, "search.pruner", Pruner, {"kind": pruner} if isinstance(pruner, str) else pruner
    )
    if pruner.kind != "none" and len(objectives) > 1:
        raise fail("search.pruner", "Optuna prunes single-objective searches only")
    if pruner.kind != "none":
        # the pruner compares per-epoch validation accuracy: it needs a validation split
        # and an objective that is maximised like it
        if SEARCH_OBJECTIVES[objectives[0]] != "max":
            raise fail(
                "search.pruner",
                f"prunes on validation accuracy, so the objective must be maximised; "
                f"{objectives[0]!r} is minimised",
            )
        for dataset in grid.datasets:
            if not dataset.args.get("val_fraction"):
                raise fail(
                    f"datasets.{dataset.name}",
                    "the search's pruner needs a validation split: set val_fraction",
                )
    scalars = {k: raw[k] for k in SEARCH_SCALARS if raw.get(k) is not None}
    if "timeout_s" in scalars:
        scalars["timeout_s"] = _float_or_same(scalars["timeout_s"])
    scalars.setdefault("n_parallel", grid.resources.max_concurrent)
    scalars.setdefault("study", grid.name)
    try:
        search = Search(
            objectives=tuple(objectives),
            budget_mb=float(budget),
            limits=limits,
            train=train,
            method_args=method_args,
            pruner=pruner,
            **scalars,
        )
    except ValueError as exc:
        raise fail("search", str(exc)) from None
    if not search.storage and "://" in grid.output:
        raise fail(
            "search.storage",
            f"the output {grid.output!r} is a URI, where SQLite cannot live: give a storage URL",
        )
    return search


def _float_or_same(value: Any) -> Any:
    """YAML reads ``1e-3`` as a string: a string that is a number becomes that float."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _train_dimensions(fail: Any, value: Any, train: TrainConfig) -> tuple[Dimension, ...]:
    """Searched TrainConfig fields, each candidate checked by TrainConfig itself."""
    where = "search.space.train"
    if not isinstance(value, dict):
        raise fail(where, f"must map TrainConfig fields to ranges, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "device"}
    dims = []
    for name, spec in value.items():
        if name not in fields:
            raise fail(f"{where}.{name}", f"not searchable; valid: {', '.join(fields)}")
        kind = type(fields[name].default)

        def check(v: Any, name: str = name, kind: type = kind) -> Any:
            if kind is float and is_number(v):
                v = float(v)
            return getattr(dataclasses.replace(train, **{name: v}), name)

        dims.append(_dimension(fail, f"{where}.{name}", name, spec, kind, check))
    return tuple(dims)


def _method_dimensions(fail: Any, value: Any, grid: Grid) -> dict[str, tuple[Dimension, ...]]:
    """Searched method arguments: method -> argument -> range; every candidate is checked
    (and made canonical, e.g. 16 -> 16.0 for a float) by the method's config dataclass."""
    from workers.methods import METHODS

    if not isinstance(value, dict):
        raise fail("search.space.methods", f"must map methods to ranges, got {value!r}")
    methods = {c.name: c for c in grid.methods}
    out = {}
    for name, ranges in value.items():
        where = f"search.space.methods.{name}"
        if name not in methods:
            raise fail(where, f"not one of the grid's methods ({', '.join(methods)})")
        if not isinstance(ranges, dict) or not ranges:
            raise fail(where, f"must map argument names to ranges, got {ranges!r}")
        base = methods[name].args
        # every argument, also those a resolved spec leaves out at their default
        every = dataclasses.asdict(METHODS.make_config(name, base))
        dims = []
        for arg, spec in ranges.items():
            if arg not in every:
                valid = ", ".join(sorted(every)) or "(it takes none)"
                raise fail(f"{where}.{arg}", f"unknown argument of {name}; valid: {valid}")

            def check(v: Any, name: str = name, arg: str = arg, base: dict = base) -> Any:
                config = METHODS.make_config(name, {**base, arg: v})
                return METHODS.resolve_args(name, {**base, arg: v}).get(arg, getattr(config, arg))

            dims.append(_dimension(fail, f"{where}.{arg}", arg, spec, type(every[arg]), check))
        out[name] = tuple(dims)
    return out


def _dimension(fail: Any, where: str, name: str, value: Any, kind: type, check: Any) -> Dimension:
    """A list of choices or ``{low, high[, log, step]}``; ``check`` validates (and makes
    canonical) one value of the field, raising ValueError with the reason."""

    def checked(v: Any) -> Any:
        try:
            return check(v)
        except ValueError as exc:
            raise fail(where, f"{v!r} is not a valid value: {exc}") from None

    if isinstance(value, list):
        if not value or not all(_is_hashable_scalar(v) or isinstance(v, bool) for v in value):
            raise fail(where, f"choices must be a non-empty list of scalars, got {value!r}")
        choices = [checked(_float_or_same(v) if kind is float else v) for v in value]
        _no_duplicates(fail, where, choices)
        return Dimension(name, choices=tuple(choices))
    if not isinstance(value, dict):
        raise fail(where, f"must be a list of choices or {{low, high[, log, step]}}, got {value!r}")
    unknown = sorted(set(value) - {"low", "high", "log", "step"})
    if unknown or "low" not in value or "high" not in value:
        raise fail(where, f"an interval is {{low, high[, log, step]}}, got {value!r}")
    if kind not in (int, float):
        raise fail(where, f"{name} is not a number: give a list of choices")
    low, high, step = (_float_or_same(value.get(k)) for k in ("low", "high", "step"))
    log = value.get("log", False)
    integer = kind is int
    number = is_int if integer else is_number
    if not number(low) or not number(high) or (step is not None and not number(step)):
        what = "integers" if integer else "numbers"
        raise fail(where, f"low, high and step must be {what}, got {value!r}")
    if not isinstance(log, bool):
        raise fail(where, f"log must be true or false, got {log!r}")
    if low >= high:
        raise fail(where, f"low must be below high, got {low!r} and {high!r}")
    if log and (low <= 0 or step is not None):
        raise fail(where, "a log interval needs low > 0 and no step")
    if step is not None and step <= 0:
        raise fail(where, f"step must be > 0, got {step!r}")
    low, high = checked(low), checked(high)
    return Dimension(name, low=low, high=high, log=log, step=step, integer=integer)


# ---------------------------------------------------------------- the deploy section


def _deploy(fail: Any, raw: Any, grid: Grid) -> dict[str, Any]:
    """The ``deploy:`` section, resolved (``workers.deploy.DeployConfig``). A variant that
    does not apply to some backbone (quamba2 on a non-Mamba one) is skipped in those
    trials, with the reason in their records; shipping it there is an error, since those
    records would have no deployment figures; so is listing it for no backbone at all."""
    from workers.deploy import DeployConfig, not_applicable

    config = _dataclass_from(fail, "deploy", DeployConfig, raw)
    backbones = [c.name for c in grid.backbones]
    for variant in config.variants:
        reasons = {b: not_applicable(variant, b) for b in backbones}
        reasons = {b: why for b, why in reasons.items() if why}
        if not reasons:
            continue
        backbone, why = next(iter(reasons.items()))
        if variant == config.ship:
            raise fail(
                "deploy.ship",
                f"{why}: the ({backbone}, {variant}) trials would ship nothing; set ship (by "
                "default the last variant) to one that every backbone has, or give these "
                "backbones a grid of their own",
            )
        if len(reasons) == len(backbones):
            raise fail("deploy.variants", f"{variant} applies to none of the backbones: {why}")
        log.info("deploy: %s is skipped for %s", variant, ", ".join(reasons))
    return config.to_dict()


def _scheduler(fail: Any, value: Any) -> Scheduler:
    from orchestrator.scheduler import Scheduler

    return _dataclass_from(fail, "scheduler", Scheduler, value)


def _tracking(fail: Any, value: Any, output: str) -> dict[str, Any]:
    from orchestrator.tracking import TRACKERS

    if not isinstance(value, dict) or not value:
        raise fail("tracking", f"must be a mapping of trackers, got {shown(value)}")
    trackers = {}
    for name, args in value.items():
        tracker = TRACKERS.get(name)
        if tracker is None:
            raise fail(
                f"tracking.{shorten(str(name), MAX_SHOWN)}",
                f"unknown tracker {shown(name)}; valid: {', '.join(TRACKERS)}",
            )
        trackers[name] = _dataclass_from(fail, f"tracking.{name}", tracker.config, args or {})
        if tracker.missing():
            raise fail(f"tracking.{name}", tracker.missing())
    # their defaults are files in the output folder: a URI output needs them named
    for name, field_name in (("mlflow", "tracking_uri"), ("wandb", "dir")):
        if name in trackers and not getattr(trackers[name], field_name) and "://" in output:
            raise fail(f"tracking.{name}.{field_name}", "required when the output is a URI")
    return trackers
