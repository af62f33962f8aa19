"""The Optuna search: its grid section, the ask/tell loop on the synthetic landscape of
``benchmarks/search.py`` (a deterministic trial kind, run in this process), and one
search end to end through Ray with tiny real trials."""

from __future__ import annotations

import copy
import json
import math
import statistics
import subprocess
import sys
import wsgiref.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest

from benchmarks import search as landscape
from orchestrator.cli import main
from orchestrator.expansion import expand
from orchestrator.grid import GridError, parse_grid
from orchestrator.records import RecordStore, TrialRecord
from orchestrator.search import (
    InProcessRunner,
    SearchMismatch,
    SearchResult,
    definition,
    measured,
    named_constraints,
    run_search,
    violations,
    write_result,
)
from orchestrator.spec import TrialSpec
from tests.conftest import TINY_GRID

MEMORY = "sqlite:///:memory:"  # where the storage itself is not under test: faster


def landscape_grid(out: Path, **search: Any) -> dict[str, Any]:
    raw = landscape.grid(str(out))
    raw["search"].update(search)
    return raw


class Counting:
    """The landscape's trial function, counting runs per spec and epochs per run."""

    def __init__(self) -> None:
        self.runs: list[TrialSpec] = []
        self.epochs: dict[str, int] = {}

    def __call__(self, spec: TrialSpec, progress: Callable[[dict[str, float]], None]) -> Any:
        self.runs.append(spec)

        def counted(figures: dict[str, float]) -> None:
            self.epochs[spec.trial_id] = int(figures["epoch"])
            progress(figures)

        return landscape.trial(spec, counted)


def search(raw: dict[str, Any], fn: Callable[..., TrialRecord], **kw: Any) -> SearchResult:
    grid = parse_grid(raw, "landscape.yaml")
    return run_search(grid, RecordStore(grid.output), lambda _: InProcessRunner(fn), **kw)


def study_of(raw: dict[str, Any], out: Path) -> optuna.Study:
    return optuna.load_study(
        study_name=raw["search"].get("study", "landscape"), storage=f"sqlite:///{out}/search.db"
    )


# ---------------------------------------------------------------- the grid's section


def test_search_section_is_validated_into_typed_dimensions(tmp_path: Path) -> None:
    raw = copy.deepcopy(TINY_GRID)
    raw["methods"] = {"full": {}, "lora": {"r": 8, "alpha": 16}}
    raw["search"] = {
        "objectives": ["accuracy", "energy_j"],
        "constraints": {"energy_j": "1e3"},
        "space": {
            "train": {"lr": {"low": "1e-4", "high": 1.0e-2, "log": True}, "epochs": [1, 2]},
            "methods": {"lora": {"r": {"low": 2, "high": 16, "step": 2}, "alpha": [8, 16]}},
        },
    }
    search = parse_grid(raw).search
    assert search is not None
    assert search.directions == ["maximize", "minimize"]
    assert search.limits == {"energy_j": 1000.0}  # YAML's "1e3" string read as the number
    lr, epochs = search.train
    assert (lr.low, lr.high, lr.log, lr.integer) == (1e-4, 1e-2, True, False)
    assert epochs.choices == (1, 2)
    r, alpha = search.method_args["lora"]
    assert r.integer and (r.low, r.high, r.step) == (2, 16, 2)
    assert alpha.choices == (8.0, 16.0)  # made canonical by LoraConfig (a float field)
    assert (search.budget_mb, search.n_parallel, search.study) == (2048.0, 2, "tiny")
    assert parse_grid(TINY_GRID).search is None  # `orchestrate run` grids are unaffected


@pytest.mark.parametrize(
    ("section", "where", "says"),
    [
        ({"objectives": ["acc"]}, "search.objectives", "unknown objective 'acc'; valid: accuracy"),
        ({"constraints": {"peak_mem_mb": 10}}, "search.constraints.peak_mem_mb", "budget_mb"),
        ({"constraints": {"flops": 10}}, "search.constraints.flops", "valid: energy_j"),
        ({"constraints": {"energy_j": -1}}, "search.constraints.energy_j", "got -1"),
        ({"space": {"train": {"lr": [0]}}}, "search.space.train.lr", "lr must be a number > 0"),
        ({"space": {"train": {"device": ["cpu"]}}}, "search.space.train.device", "valid: epochs"),
        (
            {"space": {"train": {"epochs": {"low": 1.5, "high": 3}}}},
            "search.space.train.epochs",
            "integers",
        ),
        (
            {"space": {"train": {"lr": {"low": 0, "high": 1, "log": True}}}},
            "search.space.train.lr",
            "low > 0",
        ),
        (
            {"space": {"train": {"optimizer": {"low": 1, "high": 2}}}},
            "search.space.train.optimizer",
            "choices",
        ),
        ({"space": {"methods": {"lora": {"r": [4]}}}}, "search.space.methods.lora", "full, bitfit"),
        ({"space": {"methods": {"full": {"r": [4]}}}}, "search.space.methods.full.r", "unknown"),
        ({"space": {"extra": {}}}, "search.space.extra", "valid: train, methods"),
        ({"sampler": "cma", "trials": 0}, "search", "trials must be an integer >= 1, got 0"),
        ({"sampler": "nsgaii", "startup_trials": 1}, "search", "startup_trials must be"),
        ({"storage": "search.db"}, "search", "SQLAlchemy URL"),
        ({"pruner": "median", "objectives": ["accuracy", "energy_j"]}, "search.pruner", "single"),
        ({"pruner": {"kind": "hyperband"}}, "search.pruner", "kind must be one of"),
        ({"seeds": 1}, "search.seeds", "unknown field"),
    ],
)
def test_bad_search_sections_fail_naming_the_field_and_value(
    section: dict[str, Any], where: str, says: str
) -> None:
    raw = copy.deepcopy(TINY_GRID)
    raw["search"] = section
    with pytest.raises(GridError) as info:
        parse_grid(raw, "grid.yaml")
    assert str(info.value).startswith(f"grid.yaml: {where}")
    assert says in str(info.value)


def test_several_budgets_need_the_search_to_name_one() -> None:
    raw = copy.deepcopy(TINY_GRID)
    raw["budget_mb"] = [512, 1024]
    raw["search"] = {}
    with pytest.raises(GridError, match=r"search.budget_mb: the grid has budgets \[512.0, 1024"):
        parse_grid(raw)
    raw["search"] = {"budget_mb": 512}
    assert parse_grid(raw).search.budget_mb == 512.0  # type: ignore[union-attr]


# ---------------------------------------------------------------- the loop


def test_constraints_are_respected_and_told_to_optuna(tmp_path: Path) -> None:
    raw = landscape_grid(tmp_path, objectives=["accuracy", "energy_j"], trials=40, sampler="tpe")
    result = search(raw, Counting())
    store = RecordStore(tmp_path)
    records = [store.read_record(i) for i in store.existing_ids()]
    infeasible = [r for r in records if not landscape.feasible(r) and r.status != "failed"]
    assert infeasible, "the landscape's limits should have cut some trials"
    assert {r.status for r in records} >= {"ok", "over_budget"}

    # the returned set: feasible by the records, and a Pareto front among feasible records
    assert result.best
    feasible = [r for r in records if landscape.feasible(r)]
    for best in result.best:
        record = store.read_record(best.trial_id)
        assert landscape.feasible(record), best
        assert best.values == {"accuracy": record.accuracy, "energy_j": record.energy_j}
        assert not any(
            r.accuracy > record.accuracy and r.energy_j < record.energy_j for r in feasible
        )

    # what Optuna was told: measured values, constraints from each record; a trial stopped
    # over its budget before measuring anything is told the finite penalty, never -inf/inf
    study = study_of(raw, tmp_path)
    penalised = 0
    for t in study.trials:
        record = store.read_record(t.user_attrs["trial_id"])
        if record.status == "failed":
            assert t.state == optuna.trial.TrialState.FAIL and t.values is None
            continue
        cons = violations(record, parse_grid(raw).search)  # type: ignore[arg-type]
        assert named_constraints(t) == cons
        assert t.system_attrs["constraints"] == list(cons.values())  # the dashboard's copy
        assert t.user_attrs["feasible"] == landscape.feasible(record)
        if record.status == "over_budget":
            assert t.values == [0.0, 0.0] and cons["peak_mem_mb"] > 0
            assert t.user_attrs["penalised"] == ["accuracy", "energy_j"]
            penalised += 1
        else:
            assert t.values == [record.accuracy, record.energy_j]
    assert penalised >= sum(r.status == "over_budget" for r in records) > 0
    assert {t.number for t in study.best_trials} == {b.number for b in result.best}
    assert all(t.user_attrs["feasible"] for t in study.best_trials)


def test_over_budget_violation_is_positive_and_unknowns_are_infeasible() -> None:
    grid = parse_grid(landscape.grid("out"))
    assert grid.search is not None
    spec = TrialSpec(backbone="vit_test", budget_mb=grid.search.budget_mb)
    # an OOM whose measured peak is under the budget is still over it
    oom = TrialRecord(spec=spec, status="oom", peak_mem_mb=0.5 * spec.budget_mb)
    assert violations(oom, grid.search) == {"peak_mem_mb": 0.01, "energy_j": 0.0}
    # an ok trial without an energy measurement cannot be shown to keep the energy limit
    unmeasured = TrialRecord(spec=spec, status="ok", peak_mem_mb=24.0, accuracy=0.5)
    assert violations(unmeasured, grid.search) == {"peak_mem_mb": -0.5, "energy_j": 1.0}
    kept = TrialRecord(spec=spec, status="ok", peak_mem_mb=48.0, energy_j=1000.0)
    assert violations(kept, grid.search) == {"peak_mem_mb": 0.0, "energy_j": 0.25}


def test_netscore_objective_is_computed_from_the_record(tmp_path: Path) -> None:
    raw = landscape_grid(tmp_path, objectives=["netscore"], trials=8, sampler="random")
    result = search(raw, Counting())
    store = RecordStore(tmp_path)
    assert result.best
    for best in result.best:
        record = store.read_record(best.trial_id)
        (expected,) = measured(record, ("netscore",))
        assert expected is not None and best.values["netscore"] == pytest.approx(expected)


def test_resume_continues_the_same_study_without_repeating_trials(tmp_path: Path) -> None:
    first, second, third = Counting(), Counting(), Counting()
    raw = landscape_grid(tmp_path, trials=12)
    search(raw, first)
    lines: list[str] = []
    result = search(raw, second, trials=25, echo=lines.append)
    assert lines[0] == "resuming study landscape: 12 of 25 trials done"
    ran_twice = {s.trial_id for s in first.runs} & {s.trial_id for s in second.runs}
    assert not ran_twice  # a spec seen before is told from its record
    assert sum(result.outcomes.values()) == 25
    study = study_of(raw, tmp_path)
    assert sorted(t.number for t in study.trials) == list(range(25))
    assert len(first.runs) + len(second.runs) == len(RecordStore(tmp_path).existing_ids())

    # the study is complete: running it again runs nothing
    again = search(raw, third, trials=25)
    assert third.runs == [] and again.ran_now == 0 and again.best == result.best


def test_sqlite_storage_round_trips_and_opens_in_optunas_tools(tmp_path: Path) -> None:
    """The study as Optuna's own tools read it: a fresh connection, the ``optuna
    best-trials`` command and optuna-dashboard's API all find the feasible Pareto set of
    ``search.json``, with the measured (finite) values of every complete trial."""
    raw = landscape_grid(tmp_path, objectives=["accuracy", "energy_j"], trials=14)
    raw["search"].update(sampler="random", seed=3)  # some measured trials over the energy limit
    result = search(raw, Counting())
    url = f"sqlite:///{tmp_path}/search.db"
    assert result.storage == url
    write_result(result, RecordStore(tmp_path))
    saved = {b["number"] for b in json.loads((tmp_path / "search.json").read_text())["best"]}
    assert saved

    study = optuna.load_study(study_name="landscape", storage=url)  # a fresh connection
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["accuracy", "energy_j"]
    definition = json.loads((tmp_path / "search_definition.json").read_text())
    assert study.user_attrs == {"vramsweep_search_sha": definition["sha"]}  # short attributes
    assert definition["definition"]["limits"] == {"energy_j": 800.0}
    store = RecordStore(tmp_path)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    infeasible = [t for t in complete if not t.user_attrs["feasible"]]
    measured_infeasible = [t for t in infeasible if "penalised" not in t.user_attrs]
    assert measured_infeasible and len(infeasible) < len(complete)
    for t in complete:  # params, values and constraints as told, read back from the file
        record = store.read_record(t.user_attrs["trial_id"])
        assert t.params["backbone"] == record.spec.backbone
        assert t.params["lr"] == record.spec.train.lr
        if "penalised" in t.user_attrs:  # over its budget before training
            assert record.status == "over_budget" and t.values == [0.0, 0.0]
        else:
            assert t.values == [record.accuracy, record.energy_j]
        assert set(named_constraints(t)) == {"peak_mem_mb", "energy_j"}
    assert {t.number for t in study.best_trials} == saved

    cli = subprocess.run(
        [str(Path(sys.executable).with_name("optuna")), "best-trials", "--storage", url]
        + ["--study-name", "landscape", "-f", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    listed = json.loads(cli.stdout)
    assert {t["number"] for t in listed} == saved
    assert all(t["user_attrs"]["feasible"] for t in listed)

    from optuna_dashboard import wsgi

    app = wsgi(url)

    def get(path: str) -> tuple[str, dict[str, Any]]:
        environ: dict[str, Any] = {}
        wsgiref.util.setup_testing_defaults(environ)
        environ["PATH_INFO"] = path
        status: list[str] = []
        body = b"".join(app(environ, lambda s, h, e=None: status.append(s)))
        return status[0], json.loads(body)

    status, studies = get("/api/studies")
    assert status == "200 OK"
    (summary,) = studies["study_summaries"]
    assert summary["study_name"] == "landscape"
    status, detail = get(f"/api/studies/{summary['study_id']}")
    assert status == "200 OK" and len(detail["trials"]) == 14
    assert detail["objective_names"] == ["accuracy", "energy_j"]
    shown = [t for t in detail["trials"] if t["state"] == "Complete"]
    assert len(shown) == len(complete)
    assert all(isinstance(v, float) and math.isfinite(v) for t in shown for v in t["values"])
    # the dashboard's Pareto plot: feasible by the constraints it reads, then non-dominated
    feasible = [t for t in shown if t["constraints"] and max(t["constraints"]) <= 0]
    assert len(feasible) == len(complete) - len(infeasible)
    assert {t["number"] for t in feasible if not _dominated(t["values"], feasible)} == saved


def _dominated(values: list[float], trials: list[dict[str, Any]]) -> bool:
    """Whether another trial has at least the accuracy (max) and at most the energy (min)."""
    acc, energy = values
    return any(
        t["values"] != values and t["values"][0] >= acc and t["values"][1] <= energy for t in trials
    )


def test_another_search_definition_refuses_to_resume(tmp_path: Path) -> None:
    raw = landscape_grid(tmp_path, trials=3)
    search(raw, Counting())
    changed = landscape_grid(tmp_path, trials=6, constraints={"energy_j": 500.0})
    with pytest.raises(SearchMismatch, match=r"differs in: limits\); give search.study a new name"):
        search(changed, Counting())
    renamed = landscape_grid(tmp_path, trials=3, constraints={"energy_j": 500.0}, study="tight")
    assert sum(search(renamed, Counting()).outcomes.values()) == 3


def test_a_study_with_the_whole_definition_as_attribute_resumes(tmp_path: Path) -> None:
    """Studies made before the short hash kept the whole definition as an attribute: the
    same search resumes them, another is refused naming what differs."""
    raw = landscape_grid(tmp_path, trials=3)
    grid = parse_grid(raw)
    old = optuna.create_study(
        study_name="landscape", storage=f"sqlite:///{tmp_path}/search.db", directions=["maximize"]
    )
    old.set_user_attr("vramsweep_search", definition(grid))
    assert sum(search(raw, Counting(), trials=5).outcomes.values()) == 5
    assert sum(search(raw, Counting(), trials=6).outcomes.values()) == 6  # now by its hash
    (tmp_path / "search_definition.json").unlink()  # another folder's driver: no file
    changed = landscape_grid(tmp_path, trials=7, constraints={"energy_j": 500.0})
    with pytest.raises(SearchMismatch, match=r"definition hash is [0-9a-f]{16}, this one's"):
        search(changed, Counting())


def test_a_searched_trial_equal_to_a_grid_trial_reuses_its_record(tmp_path: Path) -> None:
    raw = copy.deepcopy(TINY_GRID)
    raw["output"] = str(tmp_path)
    raw["methods"] = {"full": {}, "lora": {"r": 8, "alpha": 16}}
    # the same values as the grid's: a searched spec is a grid spec, to the byte
    raw["search"] = {
        "space": {"train": {"lr": [1.0e-3]}, "methods": {"lora": {"alpha": [16]}}},
        "trials": 6,
        "storage": MEMORY,
    }
    grid = parse_grid(raw)
    store = RecordStore(tmp_path)
    grid_specs = expand(grid)
    for i, spec in enumerate(grid_specs):
        store.write(TrialRecord(spec=spec, status="ok", accuracy=0.5 + 0.1 * i, peak_mem_mb=9.0))

    def must_not_run(spec: TrialSpec, progress: Callable[..., None]) -> TrialRecord:
        raise AssertionError(f"{spec.label} has a record and ran again")

    result = run_search(grid, store, lambda _: InProcessRunner(must_not_run))
    assert result.outcomes == {"reused": 6} and result.ran_now == 0
    assert {b.trial_id for b in result.best} == {grid_specs[-1].trial_id}
    assert result.best[0].values == {"accuracy": pytest.approx(0.5 + 0.1 * (len(grid_specs) - 1))}


def test_specs_in_flight_are_not_run_twice(tmp_path: Path) -> None:
    raw = landscape_grid(tmp_path, trials=12, storage=MEMORY)
    raw["search"]["space"] = {"train": {"lr": [1.0e-3]}}  # few configurations: repeats
    raw["backbones"], raw["checkpointing"] = ["vit_test"], ["static"]
    grid = parse_grid(raw)
    fn = Counting()
    result = run_search(grid, RecordStore(tmp_path), lambda _: InProcessRunner(fn, capacity=3))
    assert len({s.trial_id for s in fn.runs}) == len(fn.runs) == 3  # full, lora, bitfit
    assert result.outcomes["reused"] == 12 - result.outcomes.get("failed", 0) - 3


def test_pruner_stops_hopeless_trials_on_validation_accuracy(tmp_path: Path) -> None:
    raw = landscape_grid(
        tmp_path,
        trials=30,
        sampler="random",
        pruner={"kind": "median", "startup_trials": 3, "warmup_epochs": 1},
    )
    fn = Counting()
    result = search(raw, fn)
    study = study_of(raw, tmp_path)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and result.outcomes["pruned"] == len(pruned)
    store = RecordStore(tmp_path)
    for t in pruned:
        trial_id = t.user_attrs["trial_id"]
        reached = fn.epochs[trial_id]
        assert max(t.intermediate_values) == reached < t.params["epochs"]  # stopped early
        assert 1 < reached  # never before the warm-up epochs
        assert trial_id not in store.existing_ids()  # an unfinished trial is not a record
    assert not {t.number for t in pruned} & {b.number for b in result.best}


def test_interrupted_search_asks_its_trials_again_first(tmp_path: Path) -> None:
    raw = landscape_grid(tmp_path, trials=6)
    calls: list[TrialSpec] = []

    def interrupted(spec: TrialSpec, progress: Callable[..., None]) -> TrialRecord:
        calls.append(spec)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return landscape.trial(spec, progress)

    with pytest.raises(KeyboardInterrupt):
        search(raw, interrupted)
    lost = calls[-1]
    fn = Counting()
    result = search(raw, fn)
    assert fn.runs[0] == lost  # the interrupted trial runs first
    assert sum(result.outcomes.values()) == 6  # the interrupted one does not count


@pytest.mark.parametrize("sampler", ["nsgaii", "gp", "random"])
def test_every_sampler_keeps_the_constraints(sampler: str, tmp_path: Path) -> None:
    raw = landscape_grid(tmp_path, sampler=sampler, trials=14, startup_trials=4, storage=MEMORY)
    result = search(raw, Counting())
    store = RecordStore(tmp_path)
    assert all(landscape.feasible(store.read_record(b.trial_id)) for b in result.best)


def test_constrained_search_finds_the_feasible_optimum_in_fewer_trials_than_random() -> None:
    """Median over seeds of the trials until a feasible trial reaches 95% of the best
    feasible accuracy (benchmarks/search.py runs more seeds and prints the figures)."""
    base = parse_grid(landscape.grid("out"))
    target = landscape.TARGET * landscape.best_feasible(landscape.full_grid(base))
    cap = 50
    found = {
        sampler: [
            landscape.trials_to_target(sampler, seed, cap, target, MEMORY)[0] for seed in range(5)
        ]
        for sampler in ("tpe", "random")
    }
    assert statistics.median(found["tpe"]) < statistics.median(found["random"]), found
    assert statistics.median(found["tpe"]) <= cap, found


# ---------------------------------------------------------------- through Ray


@pytest.mark.ray
def test_search_end_to_end_through_ray(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    import ray

    tiny_grid["checkpointing"] = ["none", "static"]
    tiny_grid["search"] = {
        "space": {"train": {"lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}},
        "constraints": {"train_time_s": 120},
        "trials": 3,
        "n_parallel": 2,
    }
    path = write_grid(tiny_grid)
    try:
        assert main(["search", str(path), "--no-dashboard"]) == 0
        out = capsys.readouterr().out
        assert "[3/3]" in out and "Feasible Pareto set (best first):" in out
        output = Path(tiny_grid["output"])
        assert f"dashboard: optuna-dashboard sqlite:///{output.resolve()}/search.db" in out
        records = RecordStore(output).collect()
        assert 1 <= len(records) <= 3 and (records["status"] == "ok").all()
        assert "Budget-constrained search" in (output / "search" / "report.md").read_text()
        assert not (output / "report.md").exists()  # a sweep's report is not overwritten
        saved = json.loads((output / "search.json").read_text())
        assert saved["best"] and saved["best"][0]["trial_id"] in set(records["trial_id"])

        # a larger budget of trials continues the study
        assert main(["search", str(path), "--no-dashboard", "--trials", "4"]) == 0
        out = capsys.readouterr().out
        assert "resuming study tiny: 3 of 4 trials done" in out and "[4/4]" in out
    finally:
        if ray.is_initialized():
            ray.shutdown()


def test_search_without_a_search_section_is_a_grid_error(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["search", str(write_grid(tiny_grid))]) == 2
    err = capsys.readouterr().err
    assert "search: the grid has no search section" in err and "Traceback" not in err


def test_real_trials_are_pruned_on_their_validation_accuracy(tmp_path: Path) -> None:
    from workers.trial import run_trial

    raw = copy.deepcopy(TINY_GRID)
    raw["output"] = str(tmp_path)
    raw["datasets"]["synthetic"] = dict(raw["datasets"]["synthetic"], val_fraction=0.25)
    raw["train"] = {"epochs": 4, "batch_size": 16}
    raw["methods"] = {"full": {}}
    raw["search"] = {
        "objectives": ["accuracy"],
        # learning rates that learn, and ones that cannot move the weights
        "space": {"train": {"lr": [1.0e-2, 5.0e-3, 2.0e-3, 1.0e-9, 1.0e-8, 1.0e-7]}},
        "trials": 8,
        "sampler": "random",
        "seed": 0,
        "storage": MEMORY,
        "pruner": {"kind": "median", "startup_trials": 2, "warmup_epochs": 1},
    }
    grid = parse_grid(raw)
    epochs: dict[str, list[float]] = {}

    def trial(spec: TrialSpec, progress: Callable[[dict[str, float]], None]) -> TrialRecord:
        def sink(figures: dict[str, float]) -> None:
            if "epoch" in figures:
                epochs.setdefault(spec.trial_id, []).append(figures["val_accuracy"])
            progress(figures)

        return run_trial(spec, progress=sink, epoch_validation=True)

    store = RecordStore(tmp_path)
    result = run_search(grid, store, lambda _: InProcessRunner(trial))
    pruned = result.outcomes.get("pruned", 0)
    assert pruned >= 1
    recorded = store.existing_ids()
    stopped = [t for t, accs in epochs.items() if t not in recorded]
    assert len(stopped) == pruned
    assert all(1 < len(epochs[t]) < 4 for t in stopped)  # after warm-up, before the end
    assert all(len(accs) == 4 for t, accs in epochs.items() if t in recorded)


@pytest.mark.parametrize(
    ("change", "where", "says"),
    [
        ({"objectives": ["energy_j"]}, "search.pruner", "'energy_j' is minimised"),
        ({"val_fraction": 0.0}, "datasets.synthetic", "needs a validation split"),
    ],
)
def test_a_pruner_needs_validation_accuracy_to_agree_with_its_objective(
    tmp_path: Path, change: dict[str, Any], where: str, says: str
) -> None:
    raw = landscape_grid(tmp_path, pruner={"kind": "median"})
    if "objectives" in change:
        raw["search"]["objectives"] = change["objectives"]
    else:
        raw["datasets"]["synthetic"]["val_fraction"] = change["val_fraction"]
    with pytest.raises(GridError, match=says) as err:
        parse_grid(raw)
    assert err.value.where == where


def test_a_deployment_objective_needs_a_deploy_section(tmp_path: Path) -> None:
    raw = landscape_grid(tmp_path, objectives=["netscore_deploy_latency"])
    with pytest.raises(GridError, match="add a deploy: section"):
        parse_grid(raw)


def test_search_names_the_sweep_only_sections_it_runs_without(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from orchestrator.cli import _warn_unused_by_search

    raw = landscape_grid(tmp_path / "out")
    _warn_unused_by_search(parse_grid(raw, "grid.yaml"))
    assert not caplog.records  # a search grid without them: nothing said
    raw["scheduler"] = {"name": "asha", "metric": "train_loss"}
    _warn_unused_by_search(parse_grid(raw, "grid.yaml"))
    assert len(caplog.records) == 1
    assert caplog.records[0].levelname == "WARNING"
    assert caplog.records[0].getMessage().startswith("scheduler: used by `orchestrate run` only")
