"""``orchestrate``: the one command line of vramsweep.

    orchestrate GRID                 same as `orchestrate run GRID`
    orchestrate run GRID [--address ADDR] [--resume] [--dry-run] [--retry-failed]
                         [--max-trials N]
    orchestrate validate GRID [--max-trials N]
                                     validate + print the expanded trial table
    orchestrate search GRID [--address ADDR] [--trials N] [--timeout S]
                                     Optuna budget-constrained search (resumable)
    orchestrate collect DIR          all records of a sweep as one table
    orchestrate report DIR           Pareto analysis + HTML/PNG/Markdown report

Exit status: 0 success, 2 bad input (the message names file, field and value; a grid's
every error, one line each), 1 failure (including a sweep in which some trial ended with
status ``failed``), 141 when the reader of the output went away (``orchestrate collect DIR |
head``: no message). ``validate`` and ``run --dry-run`` write nothing and reach no network.
``-v`` / ``--verbose`` goes before or after the command; its log lines are written above
the progress bar.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from orchestrator import early_ray, pareto
from orchestrator.expansion import expand
from orchestrator.grid import MAX_TRIALS, Grid, GridError, Search, load_grid
from orchestrator.grid_errors import GridErrors, validate_grid
from orchestrator.lock import OutputBusy, OutputLock
from orchestrator.records import RecordStore, WriteError, describe_schema
from orchestrator.report import front_display, front_summary, write_report
from orchestrator.report.analysis import reported_columns
from orchestrator.signals import Interrupted, StopSignals
from orchestrator.spec import TrialSpec

if TYPE_CHECKING:
    from orchestrator.tune_driver import Connection

log = logging.getLogger(__name__)

SUBCOMMANDS = ("run", "validate", "search", "collect", "report", "schema")
TOP_FLAGS = ("-v", "--verbose")  # the options that may come before the command
PIPE_CLOSED = 128 + 13  # a shell's status for a process ended by SIGPIPE


class UsageError(Exception):
    """Bad input that is not a grid error (a missing folder, a bad flag value)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrate",
        description="Sweep backbones x PEFT methods x checkpointing x datasets x seeds "
        "under a hard memory budget, then analyse the Pareto front.",
        epilog="Example: orchestrate grid/smoke.yaml   (runs the CPU smoke sweep)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    # every command takes -v too; SUPPRESS: a command without it keeps the one given before
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log progress details",
    )
    sub = parser.add_subparsers(
        dest="command",
        metavar="COMMAND",
        parser_class=functools.partial(argparse.ArgumentParser, parents=[verbose]),
    )

    run = sub.add_parser("run", help="run a grid (the default command)")
    run.add_argument("grid", help="grid YAML file")
    run.add_argument("--address", help="Ray cluster address to join (default: start a local Ray)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue a sweep: trials that already have a record are skipped "
        "(always the case; the flag states it)",
    )
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="also re-run trials whose record has status failed",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the trials that would run; run, write and contact nothing",
    )
    _max_trials_flag(run)
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--no-dashboard",
        action="store_true",
        help="do not start the Ray dashboard of a local Ray (a cluster keeps its own)",
    )

    val = sub.add_parser("validate", help="validate a grid and print its expanded trials")
    val.add_argument("grid", help="grid YAML file")
    _max_trials_flag(val)

    search = sub.add_parser(
        "search",
        help="Optuna search under memory/energy budgets",
        description="Search the grid's space with Optuna for the best configurations that keep "
        "the search section's limits (peak memory <= budget_mb, energy, training time). The "
        "study is stored (SQLite file search.db in the output folder by default) and resumed "
        "by running the same command again; records go where `orchestrate run` puts them.",
    )
    search.add_argument("grid", help="grid YAML file with a search section")
    search.add_argument("--address", help="Ray cluster address to join (default: a local Ray)")
    search.add_argument(
        "--trials",
        type=int,
        help="trials of the study in all, counting earlier runs of it (default: search.trials)",
    )
    search.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="start no trial after S seconds (default: search.timeout_s; running trials finish)",
    )
    search.add_argument(
        "--no-dashboard", action="store_true", help="do not start the Ray dashboard of a local Ray"
    )

    collect = sub.add_parser("collect", help="all records of a sweep as one table")
    collect.add_argument("dir", help="the sweep's output folder")
    collect.add_argument("--out", help="write the table to this .parquet or .csv file")

    report = sub.add_parser("report", help="Pareto analysis and HTML/PNG/Markdown report")
    report.add_argument("dir", help="the sweep's output folder")

    sub.add_parser("schema", help="print the record schema (Markdown table)")
    return parser


def _max_trials_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-trials",
        type=int,
        default=MAX_TRIALS,
        metavar="N",
        help=f"refuse a grid whose axes multiply to more than N trials (default {MAX_TRIALS:,})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # a closed pipe shows here rather than at the interpreter's exit
        return status
    except BrokenPipeError:  # `orchestrate collect DIR | head`: the reader has what it wanted
        _leave_ray()
        return _pipe_closed()


def _main(argv: list[str]) -> int:
    flags = next((i for i, a in enumerate(argv) if a not in TOP_FLAGS), len(argv))
    if flags < len(argv) and not argv[flags].startswith("-") and argv[flags] not in SUBCOMMANDS:
        argv.insert(flags, "run")  # `orchestrate [-v] GRID`
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        # SIGINT/SIGTERM stop a command cleanly; run and search hold them while they
        # wind their trials down (args.signals); log lines go above a progress bar
        with StopSignals() as args.signals, _above_progress_bars():
            return COMMANDS[args.command](args)
    except GridError as exc:
        _show_grid_error(exc)
        return 2
    except (UsageError, OutputBusy) as exc:
        print(f"orchestrate: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        _leave_ray()
        print(
            f"orchestrate: interrupted ({exc}); finished trials are recorded, "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return exc.exit_status
    except WriteError as exc:  # the output went read-only or full: one line, no traceback
        _leave_ray()
        print(f"orchestrate: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "orchestrate: interrupted; finished trials are recorded, "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:
        raise  # main's: no message
    except Exception as exc:  # noqa: BLE001 - one line for the user, details with -v
        if args.verbose:
            log.exception("failed")
        print(f"orchestrate: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _show_grid_error(exc: GridError) -> None:
    """Every error of a grid, one line each, once (shown: not again)."""
    if exc.shown:
        return
    for line in exc.lines() if isinstance(exc, GridErrors) else [str(exc)]:
        print(f"orchestrate: error: {line}", file=sys.stderr, flush=True)
    exc.shown = True


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # a missing optional CPU kernel package is not the user's concern
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _above_progress_bars() -> contextlib.AbstractContextManager:
    """Console log lines written through tqdm: above a progress bar, not into it."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def _pipe_closed() -> int:
    """Standard output's reader is gone: point it at /dev/null, so that the interpreter's
    last flush finds nowhere to fail, and end with the status of a process SIGPIPE ended."""
    with contextlib.suppress(OSError, ValueError):  # no file descriptor (a test's capture)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return PIPE_CLOSED


# ---------------------------------------------------------------- commands


def _trial_table(specs: Sequence[TrialSpec]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "trial_id": s.trial_id,
                "kind": s.kind,
                "backbone": s.backbone,
                "method": s.method or s.baseline,
                "checkpointing": s.checkpointing,
                "dataset": s.dataset,
                "budget_mb": s.budget_mb,
                "seed": s.seed,
            }
            for s in specs
        ]
    )


def _load(path: str, max_trials: int) -> tuple[Grid, list[TrialSpec]]:
    if max_trials < 1:
        raise UsageError(f"--max-trials must be >= 1, got {max_trials}")
    grid = validate_grid(path, max_trials)  # every error of the grid at once
    try:
        specs = expand(grid)
    except ValueError as exc:
        raise GridError(path, "grid", str(exc)) from None
    if not specs:
        raise GridError(path, "exclude", "every trial is excluded: nothing to run")
    return grid, specs


def cmd_validate(args: argparse.Namespace) -> int:
    grid, specs = _load(args.grid, args.max_trials)
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(_trial_table(specs).to_string(index=False))
    print(f"\n{args.grid}: valid; {len(specs)} trials -> {grid.output}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.dry_run:
        grid, specs = _load(args.grid, args.max_trials)
        return _dry_run(grid, specs, args.retry_failed)
    grid, specs, connection = _load_while_ray_starts(args)
    store = RecordStore(grid.output)
    try:
        with _owned(store):
            return _sweep(args, grid, specs, store, connection)
    except BaseException:  # OutputBusy, among others: the sweep never ran on it
        if connection is not None:  # the Ray started for this sweep
            _leave_ray()
        raise


def _load_while_ray_starts(
    args: argparse.Namespace,
) -> tuple[Grid, list[TrialSpec], Connection | None]:
    """``_load``, and a local Ray started while the backbones are built where the grid
    without them says how (``orchestrator.early_ray``); None where the sweep starts its
    own."""
    checked = early_ray.checked_for_start(args.grid, args.max_trials, args.address)
    if checked is None:
        return (*_load(args.grid, args.max_trials), None)
    first, specs = checked
    from orchestrator.tune_driver import start_ray

    def start() -> Connection:
        signals: StopSignals = args.signals
        with signals.held():  # a first Ctrl-C lets Ray finish starting, then stops it
            connection = start_ray(
                args.address, not args.no_dashboard, first.plugins, first.resources
            )
        signals.check()  # raises Interrupted, and _main stops the Ray
        return connection

    def validate() -> Grid:
        try:
            return validate_grid(args.grid, args.max_trials)
        except GridError as exc:  # shown at once; the command ends once Ray has stopped
            _show_grid_error(exc)
            raise

    grid, connection = early_ray.validate_while_starting(
        validate, start, lambda grid: grid == first
    )
    if grid != first:  # the file changed since it was first read: its Ray is stopped
        return (*_load(args.grid, args.max_trials), None)
    return grid, specs, connection


def _sweep(
    args: argparse.Namespace,
    grid: Grid,
    specs: list[TrialSpec],
    store: RecordStore,
    connection: Connection | None = None,
) -> int:
    """``run`` once the output is this driver's: the trials without a record, the report
    (on ``connection``'s Ray, when one was started for it)."""
    signals: StopSignals = args.signals
    done = store.existing_ids()
    if args.retry_failed:
        frame = store.collect()
        done -= set(frame.loc[frame["status"] == "failed", "trial_id"])
    todo = [s for s in specs if s.trial_id not in done]
    print(
        f"{grid.name}: {len(specs)} trials, {len(specs) - len(todo)} already recorded, "
        f"{len(todo)} to run -> {store.output}"
    )
    _keep_grid(args.grid, store, "grid.yaml")
    if todo:
        from orchestrator.tune_driver import run_sweep

        try:
            with signals.held():
                outcome = run_sweep(
                    todo,
                    store,
                    grid.resources,
                    name=grid.name,
                    energy=grid.energy,
                    plugins=grid.plugins,
                    address=args.address,
                    dashboard=not args.no_dashboard,
                    show_progress=not args.no_progress,
                    should_stop=lambda: signals.requested,
                    scheduler=grid.scheduler,
                    tracking=grid.tracking,
                    connection=connection,
                )
        except ValueError as exc:  # resources the cluster cannot provide
            raise UsageError(str(exc)) from None
        ran = f"{outcome.recorded} of {len(todo)} trials in {outcome.wall_time_s:.1f} s"
        if outcome.interrupted:  # the report stays that of the last whole sweep
            print(f"stopped: recorded {ran} ({outcome.crashed} crashed); no report written")
            signals.check()
        print(f"ran {ran} ({outcome.crashed} crashed)")
    elif connection is not None:  # recorded meanwhile by another driver: no trial left
        _leave_ray()
    frame = store.collect()
    _print_quarantined(store)
    frame = frame[frame["trial_id"].isin({s.trial_id for s in specs})]
    _print_front(frame)
    files = write_report(frame, store, grid.name)
    print(files.summary())
    return _exit_status(frame, store)


def cmd_search(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid, max_trials=None)  # a search never expands the whole grid
    if grid.search is None:
        raise GridError(
            args.grid,
            "search",
            "the grid has no search section, so there is nothing to search "
            "(grid/search.yaml has one; `orchestrate run` runs the whole grid)",
        )
    for flag, value in (("--trials", args.trials), ("--timeout", args.timeout)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be > 0, got {value:g}")
    _warn_unused_by_search(grid)
    import optuna

    optuna.logging.disable_default_handler()  # Optuna's lines go through our logging (-v)
    optuna.logging.enable_propagation()
    store = RecordStore(grid.output)
    with _owned(store):
        return _search(args, grid, store)


def _warn_unused_by_search(grid: Grid) -> None:
    """Name the grid's sweep-only sections, which a search runs without."""
    unused = [name for name in ("scheduler", "tracking") if getattr(grid, name)]
    if unused:
        log.warning(
            "%s: used by `orchestrate run` only; this search runs its trials without it "
            "(its early stopping is search.pruner)",
            ", ".join(unused),
        )


def _search(args: argparse.Namespace, grid: Grid, store: RecordStore) -> int:
    """``search`` once the output is this driver's."""
    from orchestrator.search import SearchMismatch, dashboard_command, run_search, write_result
    from orchestrator.tune_driver import ARTIFACTS, SpecRunner

    assert grid.search is not None
    signals: StopSignals = args.signals
    _keep_grid(args.grid, store, "search.yaml")
    search = grid.search
    print(
        f"{grid.name}: search {', '.join(search.objectives)} with {search.sampler}, "
        f"{args.trials or search.trials} trials, {search.n_parallel} at once, peak memory <= "
        f"{search.budget_mb:g} MiB"
        + "".join(f", {k} <= {v:g}" for k, v in search.limits.items())
        + f" -> {store.output}"
    )

    def start_runner(s: Search) -> SpecRunner:
        try:
            return SpecRunner(
                grid.resources,
                budgets_mb={s.budget_mb},
                capacity=s.n_parallel,
                energy=grid.energy,
                plugins=grid.plugins,
                address=args.address,
                dashboard=not args.no_dashboard,
                forward_progress=s.pruner.kind != "none",
                artifacts=store.folder(ARTIFACTS),
            )
        except ValueError as exc:  # resources the cluster cannot provide
            raise UsageError(str(exc)) from None

    try:
        with signals.held():
            result = run_search(
                grid,
                store,
                start_runner,
                trials=args.trials,
                timeout_s=args.timeout,
                echo=print,
                should_stop=lambda: signals.requested,
            )
    except SearchMismatch as exc:  # the stored study belongs to another search
        raise UsageError(str(exc)) from None
    ran = f"ran {result.ran_now} trials in {result.wall_time_s:.1f} s; {result.summary}"
    if result.interrupted:  # the result and report stay those of the last whole search
        print(f"\nstopped: {ran}; no result or report written")
        signals.check()
    print(f"\n{ran}")
    print("\nFeasible Pareto set" + (" (best first):" if result.best else ": (no feasible trial)"))
    if result.best:
        with pd.option_context("display.width", 200, "display.max_colwidth", 80):
            print(result.table().to_string(index=False))
    json_path, md_path = write_result(result, store)
    frame = store.collect()
    _print_quarantined(store)
    frame = frame[frame["trial_id"].isin(set(result.trial_ids))]
    if not frame.empty:
        files = write_report(
            frame,
            store,
            f"{grid.name}: budget-constrained search",
            sections=[result.section()],
            folder="search",
        )
        print(files.listing())
    print(f"result: {md_path}\n        {json_path}")
    print(f"dashboard: {dashboard_command(result.storage)}")
    return _exit_status(frame, store)


def _dry_run(grid: Grid, specs: list[TrialSpec], retry_failed: bool) -> int:
    """What ``run`` would do, from the records as they are: nothing is created, moved
    or written, and a URI output is not contacted (all its trials are listed)."""
    if "://" in grid.output:
        done: set[str] = set()
        print(f"(a dry run does not contact {grid.output}: its records are not counted)")
    else:
        done = _recorded_ids(Path(grid.output).resolve() / "records", retry_failed)
    todo = [s for s in specs if s.trial_id not in done]
    print(
        f"{grid.name}: {len(specs)} trials, {len(specs) - len(todo)} already recorded, "
        f"{len(todo)} to run -> {grid.output} (dry run)"
    )
    if todo:
        print(_trial_table(todo).to_string(index=False))
    return 0


def _recorded_ids(folder: Path, retry_failed: bool) -> set[str]:
    """Trial ids with a readable record in ``folder`` (read only: a file that does not
    read counts as not recorded, and is left where it is); with ``retry_failed``,
    ``failed`` records do not count (records.recorded_ids: single files and parts)."""
    from orchestrator.records import recorded_ids

    return recorded_ids(folder, retry_failed)


def _owned(store: RecordStore) -> contextlib.AbstractContextManager:
    """The output folder's lock (orchestrator.lock); none for an object-store output."""
    if store.is_uri:
        log.warning("%s: an object-store output has no lock: run one driver on it", store.output)
        return contextlib.nullcontext()
    return OutputLock(store.output)


def _keep_grid(grid_path: str, store: RecordStore, name: str) -> None:
    """Copy the grid into the output folder, unless it is that copy (a resumed sweep)."""
    if store.is_uri:
        return
    target = Path(store.output) / name
    if target.exists() and os.path.samefile(grid_path, target):
        return
    try:
        shutil.copyfile(grid_path, target)
    except OSError as exc:
        raise WriteError(str(target), exc) from exc


def _leave_ray() -> None:
    """Stop this driver's Ray, when it started one: no trial of it runs on."""
    driver = sys.modules.get("orchestrator.tune_driver")  # not imported: no Ray to leave
    if driver is not None:
        driver.disconnect()


def _exit_status(frame: pd.DataFrame, store: RecordStore) -> int:
    """1 (and where to look) when a trial of ``frame`` ended ``failed``, else 0."""
    failed = int((frame["status"] == "failed").sum()) if not frame.empty else 0
    if failed:
        print(
            f"{failed} trial(s) failed; see the error column (orchestrate collect {store.output})",
            file=sys.stderr,
        )
        return 1
    return 0


def _store_of(path: str) -> RecordStore:
    if "://" not in path and not (Path(path) / "records").is_dir():
        raise UsageError(f"{path}: no records folder here (expected {path}/records)")
    return RecordStore(path)


def cmd_collect(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    store = _store_of(args.dir)
    table = store.read_table()
    frame = table.to_pandas()
    _print_quarantined(store)
    if args.out:
        if args.out.endswith(".csv"):
            frame.to_csv(args.out, index=False)
        elif args.out.endswith(".parquet"):
            pq.write_table(table, args.out)  # each column's `doc` stays in the schema
        else:
            raise UsageError(f"--out must end in .parquet or .csv, got {args.out!r}")
        print(f"wrote {len(frame)} records to {args.out}")
    cols = ["status", *pareto.TRIAL_COLUMNS, "accuracy", "peak_mem_mb", "train_time_s"]
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(frame[cols].to_string(index=False) if len(frame) else "(no records)")
    print(f"{len(frame)} records; status: {pareto.status_counts(frame)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    store = _store_of(args.dir)
    frame = store.collect()
    _print_quarantined(store)
    if frame.empty:
        raise UsageError(f"{args.dir}: no records to report on")
    _print_front(frame)
    files = write_report(frame, store, Path(args.dir.rstrip("/")).name)
    print(files.summary())
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(describe_schema())
    return 0


def _print_quarantined(store: RecordStore) -> None:
    for name, target, reason in store.quarantined:
        print(f"unreadable record {name} ({reason}): moved to {target}", file=sys.stderr)
    if store.quarantined:
        print(
            f"{len(store.quarantined)} record(s) quarantined; their trials count as not run "
            "(`orchestrate run GRID` runs them again)",
            file=sys.stderr,
        )


def _print_front(frame: pd.DataFrame) -> None:
    """Per dataset, the Pareto front of accuracy and peak memory over the seed means."""
    seeds = pareto.aggregate_seeds(reported_columns(frame))  # not 10^5 rows of JSON text
    fronts = pareto.dataset_fronts(seeds, pareto.BASE_OBJECTIVES)
    print(
        f"\nPareto front (accuracy max, peak memory min; mean ± std over seeds) of "
        f"{len(frame)} trials, status {pareto.status_counts(frame)}:"
    )
    with pd.option_context("display.width", 200, "display.max_colwidth", 80):
        for front in fronts:
            print(f"\n{front.dataset}: {front_summary(front)}")
            print(front_display(front).to_string(index=False))
    if not fronts:
        print("(no ok trial)")


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "search": cmd_search,
    "collect": cmd_collect,
    "report": cmd_report,
    "schema": cmd_schema,
}
