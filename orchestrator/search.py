"""Optuna budget-constrained search: the only module that talks to Optuna.

``orchestrate search GRID`` looks for the best configuration of the grid's space under
hard limits (peak memory <= the budget, and optionally energy and training time)
without running the whole product. An ask/tell loop drives the study:

1. ``study.ask()``; the grid's axes (backbone, method, checkpointing, dataset) and the
   ``search.space`` (training hyper-parameters, method arguments) are suggested
   define-by-run and make one ``TrialSpec`` (the grid's first seed, ``budget_mb``).
2. A spec that already has a record (a grid sweep or an earlier search ran it) is told
   from that record without running; a spec already in flight waits for that run.
   Otherwise a runner runs it (``SpecRunner``: Ray tasks, ``n_parallel`` at once;
   ``InProcessRunner``: here, for tests and benchmarks) and its record is written the
   moment it arrives.
3. ``study.tell``: the objectives, and one constraint per limit through Optuna 5's
   ``Trial.set_constraint`` (feasible when <= 0), which TPE, NSGA-II and GP all read.
   A ``failed`` trial is told FAIL; a trial the pruner stopped, PRUNED.

Constraint values are relative violations, ``(value - limit) / limit``, so that
samplers that add violations up (TPE, NSGA-II) compare MiB, joules and seconds fairly.
An ``over_budget`` or ``oom`` trial violates the memory limit by at least
``LEAST_VIOLATION`` whatever its measured peak; a limit whose figure was not measured
is violated by ``UNKNOWN_VIOLATION`` (a trial we cannot verify is never "best").

Every trial told COMPLETE carries its measured objective values (finite numbers), and
its feasibility is its constraints only: Optuna's ``study.best_trials`` (and so
``optuna best-trials``) is the feasible Pareto set, and the samplers learn where the
infeasible region is from the constraints. The constraints are also written in the
positional form that optuna-dashboard 0.21 reads (``DASHBOARD_CONSTRAINTS``), so that
its plots tell feasible trials from infeasible ones. Never an infinity: an
``over_budget`` or ``oom`` trial stopped before measuring an objective is told the
finite ``PENALTY`` for it (accuracy 0, no training energy or time; its ``penalised``
attribute names them), infeasible by its constraints, so that the samplers still learn
where the budget is broken; any other trial lacking an objective's measurement (no
energy meter, a NetScore without accuracy) is told FAIL. ``feasible`` and ``figures``
(what was measured) are trial attributes.

The study lives in an RDB storage given as a URL (SQLite file ``search.db`` in the
output folder by default; PostgreSQL for several drivers), is resumed with
``load_if_exists``, and refuses to resume under another definition (objectives,
limits, space): the study keeps a short hash of it (``DEFINITION_ATTR``) and the
definition itself is ``search_definition.json`` in the output folder. ``trials``
counts the study's trials in all, whichever driver told them: a resumed search runs
the rest, and drivers sharing a study stop together. Heartbeats mark the trials in
flight; a trial whose driver died (no mark for ``GRACE_FACTOR`` beats) is failed by
another driver, or the next one, and asked again; an interrupted driver does that
itself. The result is the study's feasible Pareto set (``study.best_trials``).

Example (no Ray: a trial function run here; ``tune_driver.SpecRunner`` runs real trials):
    >>> grid = load_grid("grid/search.yaml")
    >>> result = run_search(
    ...     grid, RecordStore(grid.output), lambda search: InProcessRunner(my_trial_fn)
    ... )  # doctest: +SKIP
    >>> result.table()  # the feasible Pareto set  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, Trial, TrialState

from orchestrator import netscore
from orchestrator.expansion import excluded
from orchestrator.grid import Dimension, Grid, Search
from orchestrator.records import RecordStore, TrialRecord
from orchestrator.report import Section, markdown_table
from orchestrator.spec import TrialSpec, canonical_json

log = logging.getLogger(__name__)

ProgressSink = Callable[[dict[str, float]], None]
# A trial as a function: the spec and a sink for its live figures in, its record out.
TrialFn = Callable[[TrialSpec, ProgressSink], TrialRecord]

# Relative violation of a limit whose figure was not measured.
UNKNOWN_VIOLATION = 1.0
# Least violation of the memory limit by an over_budget / oom trial (its measured peak may
# be under the budget: the allocation that failed is not in it).
LEAST_VIOLATION = 0.01
INFEASIBLE_STATUSES = ("over_budget", "oom")
# What an over_budget / oom trial stopped before training is told for an objective it did
# not measure: it learnt nothing and spent nothing on training. Finite, so that Optuna's
# tools can show it; infeasible by its constraints, so that it is never among the best.
PENALTY = {"accuracy": 0.0, "energy_j": 0.0, "train_time_s": 0.0}
MEASURES = ("accuracy", "peak_mem_mb", "energy_j", "train_time_s")
# The live figures a trial reports once per epoch for the pruner (see ``on_progress``).
EPOCH_KEY, VALUE_KEY = "epoch", "val_accuracy"
SPEC_AXES = ("backbone", "method", "checkpointing", "dataset")  # named by a spec's label
POLL_S = 1.0  # how often the driver looks at running trials
HEARTBEAT_S = 30  # a trial in flight is marked alive this often...
GRACE_FACTOR = 4  # ...and taken for dead (its driver gone) after this many missed marks
# Seconds between heartbeats, when set (an integer >= 1): a shorter wait for a dead
# driver's trials, for tests and small clusters. Read when a study is opened.
HEARTBEAT_ENV = "VRAMSWEEP_SEARCH_HEARTBEAT_S"
# Study attribute: a short hash of what its trials mean (the definition is a file).
DEFINITION_ATTR = "vramsweep_search_sha"
DEFINITION_FILE = "search_definition.json"
OLD_DEFINITION_ATTR = "vramsweep_search"  # the whole definition, in studies made before
# optuna-dashboard 0.21 reads a trial's constraints only from this system attribute, a
# list (Optuna 4's form); Optuna 5 also reads it, under the keys "0", "1", ...
DASHBOARD_CONSTRAINTS = "constraints"


class SearchMismatch(ValueError):
    """The stored study was made by another search definition: its trials do not apply."""


class TrialStopped(BaseException):  # noqa: N818 - a signal, not an error
    """Raised in a trial's progress sink to stop it; a BaseException so that the trial's
    own ``except Exception`` (which turns errors into records) lets it through."""


class Runner(Protocol):
    """Runs specs for the search loop (``tune_driver.SpecRunner``, ``InProcessRunner``).

    ``submit(key, spec)`` starts a spec; ``wait(timeout_s, on_progress)`` returns the
    (key, record) of the trials that ended, record None for one that was stopped because
    ``on_progress(key, figures)`` returned False; ``close()`` stops what still runs.
    """

    capacity: int  # trials in flight at once

    def submit(self, key: int, spec: TrialSpec) -> None: ...

    def wait(
        self, timeout_s: float, on_progress: Callable[[int, dict[str, float]], bool]
    ) -> list[tuple[int, TrialRecord | None]]: ...

    def close(self) -> None: ...


class InProcessRunner:
    """Runs each trial here, one at a time, when ``wait`` is called: the search loop
    without Ray, for tests, benchmarks and debugging. Asking up to ``capacity`` trials
    before running them reproduces what the sampler sees with trials in flight."""

    def __init__(self, trial_fn: TrialFn, capacity: int = 1) -> None:
        self.trial_fn = trial_fn
        self.capacity = capacity
        self.queue: list[tuple[int, TrialSpec]] = []

    def submit(self, key: int, spec: TrialSpec) -> None:
        self.queue.append((key, spec))

    def wait(
        self, timeout_s: float, on_progress: Callable[[int, dict[str, float]], bool]
    ) -> list[tuple[int, TrialRecord | None]]:
        if not self.queue:
            return []
        key, spec = self.queue.pop(0)

        def sink(figures: dict[str, float]) -> None:
            if not on_progress(key, figures):
                raise TrialStopped

        try:
            return [(key, self.trial_fn(spec, sink))]
        except TrialStopped:
            return [(key, None)]

    def close(self) -> None:
        self.queue.clear()


# ---------------------------------------------------------------- records -> values


def measured(record: TrialRecord, objectives: tuple[str, ...]) -> list[float | None]:
    """The record's value of each objective (a NetScore variant computed from it)."""
    out: list[float | None] = []
    for name in objectives:
        if name in netscore.VARIANTS:
            row = pd.DataFrame([record.to_row()])
            scores = netscore.netscores(row, [name]).table
            value = float(scores[name].iloc[0]) if name in scores else float("nan")
            out.append(None if value != value else value)
        else:
            value = getattr(record, name)
            out.append(None if value is None else float(value))
    return out


def violations(record: TrialRecord, search: Search) -> dict[str, float]:
    """Relative violation of each limit (<= 0: kept): peak memory, then ``search.limits``.

    An unmeasured figure violates its limit by ``UNKNOWN_VIOLATION``, except in a trial
    already over its memory budget (it stopped before training): there it adds nothing,
    so that the samplers that add violations up see the one they know.
    """
    over = record.status in INFEASIBLE_STATUSES
    out = {"peak_mem_mb": _violation(record.peak_mem_mb, search.budget_mb, over)}
    if over:
        out["peak_mem_mb"] = max(out["peak_mem_mb"], LEAST_VIOLATION)
    for name, limit in search.limits.items():
        out[name] = _violation(getattr(record, name), limit, over)
    return out


def _violation(value: float | None, limit: float, over: bool) -> float:
    if value is None:
        return 0.0 if over else UNKNOWN_VIOLATION
    return (value - limit) / limit


# ---------------------------------------------------------------- the study


def storage_url(search: Search, output: str) -> str:
    """The search's storage URL: its own, or an SQLite file in the (local) output folder."""
    return search.storage or f"sqlite:///{Path(output).resolve() / 'search.db'}"


def definition(grid: Grid) -> dict[str, Any]:
    """What a trial of this search means: the same study may only continue under it."""
    search = grid.search
    assert search is not None
    axes = {
        axis: [dataclasses.asdict(c) for c in getattr(grid, axis)]
        for axis in ("backbones", "methods", "checkpointing", "datasets")
    }
    return json.loads(
        canonical_json(
            {
                "objectives": list(search.objectives),
                "budget_mb": search.budget_mb,
                "limits": search.limits,
                "axes": axes,
                "exclude": [{k: list(v) for k, v in rule.items()} for rule in grid.exclude],
                "train": dataclasses.asdict(grid.train),
                "deploy": grid.deploy,
                "space": {
                    "train": [dataclasses.asdict(d) for d in search.train],
                    "methods": {
                        m: [dataclasses.asdict(d) for d in dims]
                        for m, dims in search.method_args.items()
                    },
                },
                "seed": grid.seeds[0],
            }
        )
    )


def make_sampler(search: Search) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded.

    TPE is Optuna's default, independent TPE (a density per parameter), with the constant
    liar for the trials in flight: it handles the method arguments, which exist only when
    their method is chosen, natively, and it beat the multivariate, grouped TPE on the
    benchmark landscape (median 26 vs 41 trials to the target over 15 seeds).
    """
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=search.seed, n_startup_trials=search.startup_trials, constant_liar=True
        )
    if search.sampler == "nsgaii":
        return optuna.samplers.NSGAIISampler(
            seed=search.seed, population_size=search.startup_trials
        )
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=search.seed, n_startup_trials=search.startup_trials)
    return optuna.samplers.RandomSampler(seed=search.seed)


def make_pruner(search: Search) -> optuna.pruners.BasePruner:
    """The median stopping rule on per-epoch validation accuracy (steps are 1-based epochs:
    a trial completes ``warmup_epochs`` epochs, and can be stopped from the next one on)."""
    if search.pruner.kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=search.pruner.startup_trials,
            n_warmup_steps=search.pruner.warmup_epochs + 1,
        )
    return optuna.pruners.NopPruner()


def definition_sha(mine: dict[str, Any]) -> str:
    """The short hash of a definition that the study keeps (16 hex digits)."""
    return hashlib.sha256(canonical_json(mine).encode("utf-8")).hexdigest()[:16]


def heartbeat_s() -> int:
    """Seconds between heartbeats: ``HEARTBEAT_S``, or ``$VRAMSWEEP_SEARCH_HEARTBEAT_S``."""
    value = os.environ.get(HEARTBEAT_ENV, "")
    if not value:
        return HEARTBEAT_S
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{HEARTBEAT_ENV} must be an integer >= 1, got {value!r}")
    return int(value)


def open_study(grid: Grid, store: RecordStore) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """Create the study, or load it when it exists and has the same definition; the
    definition goes to ``search_definition.json`` in the output folder."""
    search = grid.search
    assert search is not None
    beat = heartbeat_s()
    with _quiet():
        storage = optuna.storages.RDBStorage(
            storage_url(search, grid.output),
            heartbeat_interval=beat,
            grace_period=GRACE_FACTOR * beat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=2
            ),
        )
    study = optuna.create_study(
        storage=storage,
        study_name=search.study,
        directions=search.directions,
        sampler=make_sampler(search),
        pruner=make_pruner(search),
        load_if_exists=True,
    )
    mine = definition(grid)
    sha = definition_sha(mine)
    attrs = study.user_attrs
    if DEFINITION_ATTR in attrs or OLD_DEFINITION_ATTR in attrs:
        _check_definition(grid, store, attrs, mine, sha)
    if attrs.get(DEFINITION_ATTR) != sha:
        study.set_user_attr(DEFINITION_ATTR, sha)
        with _quiet():
            study.set_metric_names(list(search.objectives))  # the dashboard's axis names
    text = json.dumps({"study": search.study, "sha": sha, "definition": mine}, indent=1)
    store.write_bytes(DEFINITION_FILE, text.encode("utf-8"))
    return study, storage


def _check_definition(
    grid: Grid, store: RecordStore, attrs: dict[str, Any], mine: dict[str, Any], sha: str
) -> None:
    """Raise SearchMismatch unless the stored study was made by this definition: its hash,
    or (a study made before the hash) the whole definition as an attribute."""
    search = grid.search
    assert search is not None
    stored = attrs.get(OLD_DEFINITION_ATTR) if DEFINITION_ATTR not in attrs else None
    if stored is None and attrs[DEFINITION_ATTR] == sha:
        return
    if stored is None:
        stored = _stored_definition(store, attrs[DEFINITION_ATTR])
    if stored == mine:
        return
    where = _without_password(storage_url(search, grid.output))
    if stored is None:
        differ = f"its definition hash is {attrs[DEFINITION_ATTR]}, this one's {sha}"
    else:
        keys = sorted(k for k in mine.keys() | stored.keys() if mine.get(k) != stored.get(k))
        differ = f"it differs in: {', '.join(keys)}"
    raise SearchMismatch(
        f"study {search.study!r} in {where} was made by another search ({differ}); "
        "give search.study a new name"
    )


def _stored_definition(store: RecordStore, sha: str) -> dict[str, Any] | None:
    """The definition that ``search_definition.json`` holds when its hash is ``sha`` (to
    name what differs); None where the file is missing, another's, or not local."""
    path = Path(store.folder(DEFINITION_FILE))
    if store.is_uri or not path.is_file():
        return None
    with contextlib.suppress(ValueError, KeyError, OSError):
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["sha"] == sha:
            return saved["definition"]
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without the warnings that Optuna gives on every use of what the search relies on:
    heartbeats (marked experimental, and meant for ``Study.optimize`` rather than
    ask/tell, which they serve as well) and metric names (experimental)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        yield


# ---------------------------------------------------------------- trial -> spec


def suggest_spec(trial: Trial, grid: Grid) -> TrialSpec:
    """The trial's spec: each grid axis with more than one entry and each dimension of the
    space suggested (define-by-run: a method's arguments only when it is chosen).

    Raises ValueError when the values make no valid spec (e.g. warm-up beyond epochs).
    """
    from workers.methods import METHODS

    search = grid.search
    assert search is not None
    chosen = {}
    for axis, components in zip(
        SPEC_AXES, (grid.backbones, grid.methods, grid.checkpointing, grid.datasets), strict=True
    ):
        by_name = {c.name: c for c in components}
        name = next(iter(by_name))
        if len(by_name) > 1:
            name = trial.suggest_categorical(axis, list(by_name))
        chosen[axis] = by_name[name]
    method = chosen["method"]
    sampled = {
        d.name: _suggest(trial, f"{method.name}.{d.name}", d)
        for d in search.method_args.get(method.name, ())
    }
    method_args = method.args
    if sampled:
        method_args = METHODS.resolve_args(method.name, {**method.args, **sampled})
    train = dataclasses.replace(
        grid.train, **{d.name: _suggest(trial, d.name, d) for d in search.train}
    )
    return TrialSpec(
        kind="finetune",
        backbone=chosen["backbone"].name,
        backbone_args=chosen["backbone"].args,
        method=method.name,
        method_args=method_args,
        checkpointing=chosen["checkpointing"].name,
        checkpointing_args=chosen["checkpointing"].args,
        dataset=chosen["dataset"].name,
        dataset_args=chosen["dataset"].args,
        budget_mb=search.budget_mb,
        train=train,
        seed=grid.seeds[0],
        deploy=grid.deploy,  # as in grid expansion: the same trial, the same id
    )


def _suggest(trial: Trial, name: str, dim: Dimension) -> Any:
    if dim.choices:
        return trial.suggest_categorical(name, list(dim.choices))
    assert dim.low is not None and dim.high is not None
    if dim.integer:
        step = int(dim.step or 1)
        return trial.suggest_int(name, int(dim.low), int(dim.high), step=step, log=dim.log)
    return trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)


# ---------------------------------------------------------------- the result


@dataclass(frozen=True)
class BestTrial:
    """One trial of the feasible Pareto set."""

    number: int  # the Optuna trial number
    trial_id: str
    label: str
    params: dict[str, Any]  # what the sampler chose
    values: dict[str, float]  # objective -> value told
    figures: dict[str, float | None]  # accuracy, peak memory, energy, training time


@dataclass(frozen=True)
class SearchResult:
    """What a search found and how it got there."""

    study: str
    storage: str
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    limits: dict[str, float]  # record column -> largest feasible value (peak memory first)
    best: tuple[BestTrial, ...]  # the feasible Pareto set (best first on the first objective)
    outcomes: dict[str, int]  # outcome -> trials of the study (ran, reused, pruned, ...)
    trial_ids: tuple[str, ...]  # records of the study's trials, for the report
    ran_now: int  # trials this invocation ran
    wall_time_s: float
    interrupted: bool = False  # stopped on request: its trials in flight were abandoned

    @property
    def summary(self) -> str:
        """One line: the study, its trials by outcome, the objectives and the limits."""
        goal = ", ".join(
            f"{o} ({'max' if d == 'maximize' else 'min'})"
            for o, d in zip(self.objectives, self.directions, strict=True)
        )
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items()))
        limits = ", ".join(f"{k} <= {v:g}" for k, v in self.limits.items())
        return (
            f"study {self.study}: {sum(self.outcomes.values())} trials ({outcomes}); "
            f"objectives {goal}; feasible when {limits}"
        )

    def table(self) -> pd.DataFrame:
        """The feasible Pareto set, one row per trial."""
        rows = []
        for b in self.best:
            row: dict[str, Any] = {"trial": b.number, "trial_id": b.trial_id, "label": b.label}
            searched = {k: v for k, v in b.params.items() if k not in SPEC_AXES}  # in the label
            row["params"] = ", ".join(f"{k}={_fmt(v)}" for k, v in searched.items())
            row.update(b.values)
            row.update({k: v for k, v in b.figures.items() if k not in (*b.values, "status")})
            rows.append(row)
        return pd.DataFrame(rows)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, allow_nan=False, default=str)

    def markdown(self) -> str:
        """The result as Markdown: what was searched, the feasible Pareto set."""
        table = self.table()
        lines = [
            f"# Search: {self.study}",
            self.summary[0].upper() + self.summary[1:] + ".",
            f"Storage: `{self.storage}`; open it with `{dashboard_command(self.storage)}`.",
            "## Feasible Pareto set",
            markdown_table(table) if not table.empty else "(no feasible trial yet)",
        ]
        return "\n\n".join(lines) + "\n"

    def section(self) -> Section:
        """The result as the first section of the sweep report."""
        text = (
            f"The feasible Pareto set of the {self.summary} "
            f"(`{dashboard_command(self.storage)}` opens the study)."
        )
        return Section("Budget-constrained search", text, self.table())


def dashboard_command(storage: str) -> str:
    return f"optuna-dashboard {storage}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_result(result: SearchResult, store: RecordStore) -> tuple[str, str]:
    """``search.json`` and ``search.md`` beside the records; returns their paths."""
    return (
        store.write_bytes("search.json", result.to_json().encode("utf-8")),
        store.write_bytes("search.md", result.markdown().encode("utf-8")),
    )


# ---------------------------------------------------------------- the loop


@dataclass
class _Run:
    """A spec in flight and the study's trials that wait for its record."""

    spec: TrialSpec
    trials: list[Trial]


class _Loop:
    """One invocation of the ask/tell loop (state shared by its steps)."""

    def __init__(
        self,
        grid: Grid,
        store: RecordStore,
        runner: Runner,
        study: optuna.Study,
        storage: optuna.storages.RDBStorage,
        echo: Callable[[str], None],
    ) -> None:
        assert grid.search is not None
        self.grid, self.search, self.store, self.runner = grid, grid.search, store, runner
        self.study, self.storage, self.echo = study, storage, echo
        self.recorded = store.existing_ids()
        self.runs: dict[int, _Run] = {}  # runner key (first trial's number) -> run
        self.by_id: dict[str, int] = {}  # trial id in flight -> runner key
        self.driver = f"{socket.gethostname()}:{os.getpid()}"  # who runs a trial
        self.done = 0  # counted trials of the study, whichever driver told them
        self.elsewhere = 0  # trials running in other drivers
        self.ran_now = 0
        self.beat = self.looked = 0.0
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        """Look at the study as the other drivers left it (at most every ``POLL_S``): fail
        a dead driver's trials (they are asked again), count the trials told and the
        trials running elsewhere."""
        if not force and time.monotonic() - self.looked < POLL_S:
            return
        self.looked = time.monotonic()
        with _quiet():
            optuna.storages.fail_stale_trials(self.study)
        mine = {t.number for run in self.runs.values() for t in run.trials}
        trials = self.study.get_trials(deepcopy=False)
        self.done = sum(1 for t in trials if _counted(t))
        self.elsewhere = sum(
            1 for t in trials if t.state == TrialState.RUNNING and t.number not in mine
        )

    # -- asking

    def waiting(self) -> int:
        return sum(len(run.trials) for run in self.runs.values())

    def wants(self, trials: int) -> bool:
        """Whether the study needs another trial asked (counting all drivers' trials)."""
        return self.done + self.waiting() + self.elsewhere < trials

    def ask(self) -> None:
        """Ask one trial; tell it at once when it cannot run or has a record."""
        with _quiet():
            trial = self.study.ask()
        # marked at once: a trial without a mark is never taken for dead
        self.storage.record_heartbeat(trial._trial_id)  # noqa: SLF001 - Optuna's id
        try:
            spec = suggest_spec(trial, self.grid)
        except ValueError as exc:
            self.tell_fail(trial, "invalid", "(no spec)", f"no valid spec: {exc}")
            return
        except BaseException:  # not in flight yet, so not abandoned: no trial left running
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        if excluded(spec, self.grid.exclude):
            self.tell_fail(trial, "excluded", spec.label, "excluded by the grid")
            return
        trial.set_user_attr("trial_id", spec.trial_id)
        trial.set_user_attr("label", spec.label)
        trial.set_user_attr("driver", self.driver)
        if spec.trial_id in self.recorded:
            self.tell(trial, self.store.read_record(spec.trial_id), "reused")
        elif spec.trial_id in self.by_id:
            self.runs[self.by_id[spec.trial_id]].trials.append(trial)
        else:
            self.runner.submit(trial.number, spec)
            self.runs[trial.number] = _Run(spec, [trial])
            self.by_id[spec.trial_id] = trial.number
        self.heartbeat(force=True)

    def heartbeat(self, force: bool = False) -> None:
        """Mark the trials in flight as alive (see ``GRACE_FACTOR``)."""
        interval = self.storage.get_heartbeat_interval() or 0
        if not force and time.monotonic() - self.beat < interval:
            return
        self.beat = time.monotonic()
        for run in self.runs.values():
            for trial in run.trials:
                self.storage.record_heartbeat(trial._trial_id)  # noqa: SLF001 - Optuna's id

    # -- telling

    def on_progress(self, key: int, figures: dict[str, float]) -> bool:
        """A running trial's live figures; False stops it. Once per epoch a trial reports
        ``{"epoch": e, "val_accuracy": a}`` (1-based epoch, accuracy on the validation
        split as a fraction): that is the pruner's intermediate value at step e."""
        run = self.runs.get(key)
        if run is None or self.search.pruner.kind == "none":
            return True
        if EPOCH_KEY not in figures or VALUE_KEY not in figures:
            return True
        trial, epoch = run.trials[0], int(figures[EPOCH_KEY])
        trial.report(float(figures[VALUE_KEY]), step=epoch)
        # after its last epoch a trial is as good as done: its record is worth more
        return epoch >= run.spec.train.epochs or not trial.should_prune()

    def record(self, records: list[TrialRecord]) -> None:
        """Write the records of runs that ended together: one group commit, one fsync."""
        self.store.write_many(records)

    def finish(self, key: int, record: TrialRecord | None) -> None:
        """A run ended, its record written (``record``): tell every trial that waited
        for it."""
        run = self.runs.pop(key)
        del self.by_id[run.spec.trial_id]
        if record is None:
            for trial in run.trials:
                trial.set_user_attr("outcome", "pruned")
                self.told(self.study.tell(trial, state=TrialState.PRUNED), run.spec.label)
            return
        self.recorded.add(record.trial_id)
        self.ran_now += 1
        for i, trial in enumerate(run.trials):
            self.tell(trial, record, "ran" if i == 0 else "reused")

    def tell(self, trial: Trial, record: TrialRecord, outcome: str) -> None:
        """Tell the study the trial's record: its measured objectives and constraints."""
        figures = {"status": record.status, **{m: getattr(record, m) for m in MEASURES}}
        trial.set_user_attr("figures", figures)
        label = record.spec.label
        if record.status not in ("ok", *INFEASIBLE_STATUSES):
            error = record.error.splitlines()[0] if record.error else record.status
            self.tell_fail(trial, "failed", label, error)
            return
        cons = violations(record, self.search)
        feasible = all(v <= 0 for v in cons.values())
        trial.set_user_attr("feasible", feasible)
        objectives = self.search.objectives
        values = measured(record, objectives)
        missing = [o for o, v in zip(objectives, values, strict=True) if v is None]
        stopped = record.status in INFEASIBLE_STATUSES
        if missing and not (stopped and all(o in PENALTY for o in missing)):
            why = f"{', '.join(missing)} not measured"
            self.tell_fail(trial, "failed", label, f"{record.status}: {why}" if stopped else why)
            return
        if missing:
            trial.set_user_attr("penalised", missing)
        told = [PENALTY[o] if v is None else v for o, v in zip(objectives, values, strict=True)]
        for name, value in cons.items():
            trial.set_constraint(name, value)
        self.storage.set_trial_system_attr(
            trial._trial_id,  # noqa: SLF001 - Optuna's id
            DASHBOARD_CONSTRAINTS,
            list(cons.values()),
        )
        trial.set_user_attr("outcome", outcome)
        self.told(self.study.tell(trial, told), label)

    def tell_fail(self, trial: Trial, outcome: str, label: str, why: str) -> None:
        trial.set_user_attr("outcome", outcome)
        trial.set_user_attr("error", why[:500])
        self.told(self.study.tell(trial, state=TrialState.FAIL), label, why)

    def told(self, frozen: FrozenTrial, label: str, note: str = "") -> None:
        """Count a trial told and say so."""
        self.done += 1
        outcome = frozen.user_attrs["outcome"]
        params = " ".join(f"{k}={_fmt(v)}" for k, v in frozen.params.items() if k not in SPEC_AXES)
        text = f"[{self.done}/{self.search.trials}] #{frozen.number} {outcome:8s} {label}"
        text += f" {params}" if params else ""
        if frozen.state == TrialState.COMPLETE:
            objectives = zip(self.search.objectives, frozen.values, strict=True)
            penalised = frozen.user_attrs.get("penalised", ())
            note = ", ".join(
                f"{o} {'not measured' if o in penalised else _fmt(v)}" for o, v in objectives
            )
            over = [k for k, v in named_constraints(frozen).items() if v > 0]
            note += f"; infeasible ({', '.join(over)})" if over else "; feasible"
        self.echo(f"{text}: {note}" if note else text)

    # -- an interruption

    def abandon(self) -> None:
        """The loop was interrupted: its trials in flight are cancelled, told FAIL (they
        do not count) and enqueued, so that a resumed search asks them first."""
        self.runner.close()
        for run in self.runs.values():
            for trial in run.trials:
                trial.set_user_attr("interrupted", True)
                self.study.tell(trial, state=TrialState.FAIL)
                self.study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
        self.runs.clear()


def named_constraints(trial: FrozenTrial) -> dict[str, float]:
    """The trial's constraints by name (without their copy for the dashboard)."""
    return {k: v for k, v in trial.constraints.items() if not k.isdigit()}


def _counted(trial: FrozenTrial) -> bool:
    """A trial that counts against ``trials``: finished with an outcome (not interrupted)."""
    return trial.state.is_finished() and "outcome" in trial.user_attrs


def run_search(
    grid: Grid,
    store: RecordStore,
    start_runner: Callable[[Search], Runner],
    *,
    trials: int | None = None,
    timeout_s: float | None = None,
    echo: Callable[[str], None] = log.info,
    should_stop: Callable[[], bool] = lambda: False,
) -> SearchResult:
    """Run (or resume) the grid's search until the study has ``trials`` counted trials
    (default ``search.trials``) or ``timeout_s`` (default ``search.timeout_s``) has
    passed; trials in flight then finish. ``start_runner`` is called with the search
    once its study is open (a study that cannot be resumed fails before any runner
    starts). ``echo`` receives one line per trial told. Once ``should_stop()`` is true
    (a SIGINT) the trials in flight are abandoned (as on an exception) and the result
    says ``interrupted``."""
    if grid.search is None:
        raise ValueError(f"{grid.source}: the grid has no search section")
    search = dataclasses.replace(
        grid.search,
        trials=trials or grid.search.trials,
        timeout_s=timeout_s or grid.search.timeout_s,
    )
    grid = dataclasses.replace(grid, search=search)
    start = time.monotonic()
    deadline = start + search.timeout_s if search.timeout_s else float("inf")
    study, storage = open_study(grid, store)
    runner = start_runner(search)
    loop = _Loop(grid, store, runner, study, storage, echo)  # a dead driver's trials: failed
    if loop.done:
        echo(f"resuming study {search.study}: {loop.done} of {search.trials} trials done")
    try:
        while not should_stop():
            asking = time.monotonic() < deadline
            if asking and len(loop.runs) < runner.capacity:
                loop.refresh(force=True)
            while asking and len(loop.runs) < runner.capacity and loop.wants(search.trials):
                loop.ask()
            if not loop.runs and not (asking and loop.elsewhere):
                break
            if not loop.runs:  # only other drivers' trials run: wait for them (or their death)
                time.sleep(POLL_S)
            ended = runner.wait(POLL_S, loop.on_progress)
            loop.record([r for _, r in ended if r is not None])  # durable before told
            for key, record in ended:
                loop.finish(key, record)
            loop.heartbeat()
            loop.refresh()
        else:  # the loop's condition, not a break, ended it: a stop was requested
            loop.abandon()
    except BaseException:
        loop.abandon()
        raise
    url = storage_url(search, grid.output)
    result = _result(study, _without_password(url), search, loop.ran_now, start)
    return dataclasses.replace(result, interrupted=should_stop())


def _without_password(url: str) -> str:
    """The URL to print and write to files: a database password stays out of them."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _result(
    study: optuna.Study, url: str, search: Search, ran_now: int, start: float
) -> SearchResult:
    trials = study.get_trials(deepcopy=False)
    outcomes: dict[str, int] = {}
    for t in trials:
        if _counted(t):
            outcomes[t.user_attrs["outcome"]] = outcomes.get(t.user_attrs["outcome"], 0) + 1
    best, seen = [], set()
    sense = -1.0 if search.directions[0] == "maximize" else 1.0
    for t in sorted(study.best_trials, key=lambda t: (sense * t.values[0], t.number)):
        if t.user_attrs["trial_id"] in seen:  # the same spec told twice (a reused record)
            continue
        seen.add(t.user_attrs["trial_id"])
        best.append(
            BestTrial(
                number=t.number,
                trial_id=t.user_attrs["trial_id"],
                label=t.user_attrs["label"],
                params=dict(t.params),
                values=dict(zip(search.objectives, t.values, strict=True)),
                figures=t.user_attrs["figures"],
            )
        )
    ids = sorted({t.user_attrs["trial_id"] for t in trials if "trial_id" in t.user_attrs})
    return SearchResult(
        study=search.study,
        storage=url,
        objectives=search.objectives,
        directions=tuple(search.directions),
        limits={"peak_mem_mb": search.budget_mb, **search.limits},
        best=tuple(best),
        outcomes=outcomes,
        trial_ids=tuple(ids),
        ran_now=ran_now,
        wall_time_s=time.monotonic() - start,
    )
