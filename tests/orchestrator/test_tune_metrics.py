"""Per-epoch figures, the scheduler and tracking sections, and the driver's handling of
stopped trials, without Ray (tests/orchestrator/test_tracking.py runs them through Ray)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from orchestrator import tracking
from orchestrator.expansion import expand
from orchestrator.grid import GridError, parse_grid
from orchestrator.records import RecordStore, TrialRecord
from orchestrator.scheduler import Scheduler
from orchestrator.spec import TrialSpec
from orchestrator.tune_driver import _Recorder, _tune_scheduler
from orchestrator.tune_metrics import (
    EPOCH_METRICS,
    epoch_result,
    final_result,
    latest_line,
    stopped_record,
)
from tests.conftest import TINY_GRID


def _grid(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    raw = copy.deepcopy(TINY_GRID)
    raw["output"] = str(tmp_path / "out")
    raw.update(sections)
    return raw


def _spec(tmp_path: Path) -> TrialSpec:
    return expand(parse_grid(_grid(tmp_path)))[0]


# ---------------------------------------------------------------- the trial's figures


def test_every_epoch_reports_its_figures_and_the_record_agrees(tmp_path: Path) -> None:
    from workers.trial import run_trial

    raw = _grid(tmp_path, methods={"full": {}})
    raw["datasets"]["synthetic"]["val_fraction"] = 0.25
    raw["train"] = {"epochs": 3, "batch_size": 16, "lr": 1.0e-3}
    (spec,) = expand(parse_grid(raw))
    seen: list[dict[str, float]] = []
    record = run_trial(spec, num_threads=1, progress=seen.append, epoch_validation=True)
    assert record.status == "ok", record.error

    epochs = [f for f in seen if "epoch" in f]
    assert [f["epoch"] for f in epochs] == [1, 2, 3]
    assert all(set(EPOCH_METRICS) <= set(f) for f in epochs)
    # the meters are named, as in the record (a stopped trial's record takes them)
    assert {(f["mem_source"], f["energy_source"]) for f in epochs} == {
        (record.mem_source, record.energy_source)
    }
    assert record.mem_source == "accounted" and record.energy_source in ("rapl", "estimated")
    assert {epoch_result(f)["mem_source"] for f in epochs} == {"accounted"}
    steps = [f["step"] for f in epochs]
    assert steps == sorted(steps) and steps[-1] == record.steps
    assert all(f["step_time_s"] > 0 and f["peak_mem_mb"] > 0 for f in epochs)
    energies = [f["energy_j"] for f in epochs]
    assert energies == sorted(energies)
    # the record's figures are those of the last epoch (same model, same split)
    assert epochs[-1]["train_loss"] == pytest.approx(record.train_loss, rel=1e-6)
    assert epochs[-1]["val_accuracy"] == pytest.approx(record.val_accuracy)
    assert 0 <= min(f["val_accuracy"] for f in epochs)


def test_epoch_result_keeps_epoch_figures_only() -> None:
    assert epoch_result({"step": 7, "loss": 0.3, "peak_mem_mb": 5.0}) is None  # mid-epoch
    result = epoch_result(
        {"epoch": 2.0, "step": 8, "train_loss": 0.5, "loss": 0.4, "val_accuracy": 0.75}
    )
    assert result == {"epoch": 2, "step": 8, "train_loss": 0.5, "val_accuracy": 0.75}
    assert isinstance(result["epoch"], int)
    named = epoch_result({"epoch": 1, "mem_source": "cuda_allocator", "energy_source": ""})
    assert named == {"epoch": 1, "mem_source": "cuda_allocator"}  # an empty name is none


def test_final_result_has_the_record_and_its_finite_figures(tmp_path: Path) -> None:
    record = TrialRecord(spec=_spec(tmp_path), status="ok", accuracy=0.5)
    record.peak_mem_mb, record.macs = 12.5, 1000
    result = final_result(record)
    assert TrialRecord.from_json(result["record"]).accuracy == 0.5
    assert result["status"] == "ok"
    assert result["accuracy"] == 0.5 and result["peak_mem_mb"] == 12.5 and result["macs"] == 1000
    assert "energy_j" not in result  # not measured: no figure
    assert "epoch" not in result  # no scheduler acts on the record's result


def test_a_stopped_record_keeps_its_last_epoch_and_collects(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    last = {"epoch": 2, "step": 6, "train_loss": 1.25, "val_accuracy": 0.25, "energy_j": 3.0}
    last |= {"peak_mem_mb": 40.0, "mem_source": "accounted", "energy_source": "rapl"}
    record = stopped_record(spec, last, "stopped early by the scheduler (asha on train_loss)")
    assert record.status == "stopped"
    assert f"after epoch 2 of {spec.train.epochs}" in record.error
    assert (record.steps, record.train_loss, record.val_accuracy) == (6, 1.25, 0.25)
    assert record.energy_j == 3.0 and record.accuracy is None
    assert (record.peak_mem_mb, record.mem_source, record.energy_source) == (
        40.0, "accounted", "rapl",
    )  # fmt: skip

    store = RecordStore(tmp_path / "out")
    store.write(record)
    frame = store.collect()
    row = frame.set_index("trial_id").loc[spec.trial_id]
    assert row["status"] == "stopped" and row["train_loss"] == 1.25


# ---------------------------------------------------------------- the driver's callback


class _Trial:
    """What the driver's callback reads of a Tune trial."""

    def __init__(self, spec: TrialSpec, n: int) -> None:
        self.trial_id = f"tune_{n}"
        self.config = {"spec": spec.to_json()}
        self.error_file = None


def _specs(tmp_path: Path) -> list[TrialSpec]:
    return expand(parse_grid(_grid(tmp_path)))


def test_the_recorder_writes_stopped_trials_and_shows_running_ones(tmp_path: Path) -> None:
    stopped_spec, finished_spec = _specs(tmp_path)
    store = RecordStore(tmp_path / "out")
    scheduler = Scheduler(name="asha", metric="val_accuracy")
    recorder = _Recorder(store, 2, show_progress=True, scheduler=scheduler)
    stopped, finished = _Trial(stopped_spec, 0), _Trial(finished_spec, 1)
    for trial in (stopped, finished):
        recorder.on_trial_start(0, [], trial)
    recorder.on_trial_result(0, [], stopped, {"epoch": 2, "train_loss": 1.5, "val_accuracy": 0.25})
    recorder.on_trial_result(0, [], finished, {"epoch": 1, "train_loss": 0.5, "val_accuracy": 0.5})
    shown = recorder.bar.postfix
    assert f"{stopped_spec.label} e2 val_accuracy=0.25" in shown
    assert f"{finished_spec.label} e1 val_accuracy=0.5" in shown

    ok = TrialRecord(spec=finished_spec, status="ok", accuracy=0.5)
    recorder.on_trial_result(0, [], finished, final_result(ok))
    recorder.on_trial_complete(0, [], finished)  # its record came: nothing more
    recorder.on_trial_complete(0, [], stopped)  # no record: the scheduler stopped it
    recorder.close()

    frame = store.collect().set_index("trial_id")
    assert frame.loc[finished_spec.trial_id, "status"] == "ok"
    row = frame.loc[stopped_spec.trial_id]
    assert row["status"] == "stopped" and row["val_accuracy"] == 0.25
    assert "asha on val_accuracy" in row["error"] and "after epoch 2" in row["error"]
    assert recorder.bad == 1 and recorder.latest == {}


def test_an_interrupted_sweep_records_no_stopped_trial(tmp_path: Path) -> None:
    (spec, _) = _specs(tmp_path)
    store = RecordStore(tmp_path / "out")
    recorder = _Recorder(store, 1, show_progress=False, should_stop=lambda: True)
    trial = _Trial(spec, 0)
    recorder.on_trial_start(0, [], trial)
    recorder.on_trial_result(0, [], trial, {"epoch": 1, "train_loss": 1.0})
    recorder.on_trial_complete(0, [], trial)  # stopped by the interrupt: cancelled
    assert store.collect().empty


def test_latest_line_falls_back_to_a_reported_metric() -> None:
    assert latest_line("a/b", {"epoch": 3, "train_loss": 0.123456}, "val_accuracy") == (
        "a/b e3 train_loss=0.1235"
    )


# ---------------------------------------------------------------- the scheduler: section


def test_a_scheduler_section_maps_onto_tune(tmp_path: Path) -> None:
    raw = _grid(tmp_path, scheduler={"name": "asha", "metric": "train_loss", "grace_period": 1})
    raw["train"]["epochs"] = 4
    grid = parse_grid(raw)
    assert grid.scheduler == Scheduler(name="asha", metric="train_loss", grace_period=1)
    assert grid.scheduler.direction == "min"
    options = grid.scheduler.options(4)
    assert options["max_t"] == 4 and options["stop_last_trials"] is False
    assert options["time_attr"] == "epoch" and "min_samples_required" not in options

    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    asha = _tune_scheduler(grid.scheduler, expand(grid))
    assert isinstance(asha, ASHAScheduler)
    assert (asha.metric, asha._mode) == ("train_loss", "min")  # Tune keeps no public mode

    median = _tune_scheduler(Scheduler(name="median_stopping", metric="val_accuracy"), [])
    assert isinstance(median, MedianStoppingRule)
    assert (median.metric, median._mode) == ("val_accuracy", "max")
    assert median._grace_period == 1  # epochs, not Tune's default 60 (seconds)


def test_no_trial_is_stopped_on_its_last_epoch(tmp_path: Path) -> None:
    raw = _grid(tmp_path, scheduler={"name": "asha", "metric": "train_loss"})
    raw["train"]["epochs"] = 3
    good, bad = expand(parse_grid(raw))  # 3 epochs each
    last = dataclasses.replace(bad, train=dataclasses.replace(bad.train, epochs=1))
    asha = _tune_scheduler(
        Scheduler(name="asha", metric="train_loss", reduction_factor=2), [good, bad]
    )
    trials = [_Trial(spec, n) for n, spec in enumerate((good, bad, last))]
    for trial in trials:
        asha.on_trial_add(None, trial)
    decide = [
        asha.on_trial_result(None, trial, {"epoch": 1, "train_loss": loss})
        for trial, loss in zip(trials, (0.5, 2.0, 2.0), strict=True)
    ]
    # the bad trial is far behind after epoch 1 of 3: stopped; the same figures on the
    # last epoch of a 1-epoch trial: it goes on to its record
    assert decide == ["CONTINUE", "STOP", "CONTINUE"]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"name": "hyperband"}, "name must be one of ['asha', 'median_stopping']"),
        ({"name": ["asha"]}, "name must be one of ['asha', 'median_stopping']"),
        ({"metric": {"val_accuracy": 1}}, "metric must be a per-epoch metric"),
        ({"metric": "accuracy"}, "metric must be a per-epoch metric"),
        ({"mode": "up"}, "mode must be min or max"),
        ({"name": "median_stopping", "reduction_factor": 3}, "not an option of median_stopping"),
        ({"grace_period": 0}, "grace_period must be an integer >= 1"),
        ({"reduction_factor": 1}, "reduction_factor must be a number in (1, 100]"),
        ({"patience": 2}, "unknown field 'patience'"),
    ],
)
def test_a_bad_scheduler_section_is_refused(
    tmp_path: Path, section: dict[str, Any], message: str
) -> None:
    with pytest.raises(GridError, match="scheduler") as info:
        parse_grid(_grid(tmp_path, scheduler=section))
    assert message in str(info.value)


# ---------------------------------------------------------------- the tracking: section


def test_a_tracking_section_names_installed_trackers(tmp_path: Path) -> None:
    grid = parse_grid(
        _grid(tmp_path, tracking={"tensorboard": None, "mlflow": {"experiment": "e"}})
    )
    assert grid.tracking == {
        "tensorboard": tracking.TensorBoard(),
        "mlflow": tracking.MLflow(experiment="e"),
    }
    uri = tracking.mlflow_uri(grid.tracking["mlflow"], grid.output)
    assert uri == f"sqlite:///{Path(grid.output).resolve()}/mlflow.db"
    assert tracking.mlflow_environment(uri) == {}
    assert tracking.mlflow_environment("file:///tmp/mlruns") == {"MLFLOW_ALLOW_FILE_STORE": "true"}


def test_a_tracker_without_its_package_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda m: None if m == "wandb" else real(m)
    )
    with pytest.raises(GridError, match=r"tracking\.wandb: needs wandb: .*vramsweep\[wandb\]"):
        parse_grid(_grid(tmp_path, tracking={"wandb": {}}))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"neptune": {}}, "unknown tracker 'neptune'; valid: tensorboard, mlflow, wandb"),
        ({"wandb": {"mode": "sometimes"}}, "mode must be one of ['auto', 'online', 'offline']"),
        ({"mlflow": {"uri": "x"}}, "unknown field 'uri'"),
        ([], "must be a mapping of trackers"),
    ],
)
def test_a_bad_tracking_section_is_refused(tmp_path: Path, section: Any, message: str) -> None:
    with pytest.raises(GridError, match="tracking") as info:
        parse_grid(_grid(tmp_path, tracking=section))
    assert message in str(info.value)


def test_trackers_of_an_object_store_output_need_their_own_place(tmp_path: Path) -> None:
    raw = _grid(tmp_path, tracking={"mlflow": {}})
    raw["output"] = "s3://bucket/sweep"
    with pytest.raises(GridError, match="tracking.mlflow.tracking_uri: required"):
        parse_grid(raw)
    raw["tracking"] = {"mlflow": {"tracking_uri": "sqlite:///m.db"}}
    assert parse_grid(raw).tracking["mlflow"].tracking_uri == "sqlite:///m.db"


def test_wandb_goes_offline_without_a_key_or_a_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    auto = tracking.WandB()
    assert tracking.wandb_mode(auto, reachable=True) == "offline"  # no key
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.wandb_mode(auto, reachable=True) == "online"
    assert tracking.wandb_mode(auto, reachable=False) == "offline"
    assert tracking.wandb_mode(dataclasses.replace(auto, mode="online"), False) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.wandb_mode(auto, reachable=True) == "offline"


def test_grid_docs_name_every_scheduler_and_tracker() -> None:
    from orchestrator.scheduler import SCHEDULERS

    text = (Path(__file__).parents[2] / "docs" / "grid.md").read_text()
    for name in [*SCHEDULERS, *tracking.TRACKERS, *EPOCH_METRICS]:
        assert f"`{name}`" in text, name
    assert "`stopped`" in text


def test_orchestrate_run_hands_both_sections_to_the_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    from orchestrator import early_ray, tune_driver
    from orchestrator.cli import main

    seen: dict[str, Any] = {}

    def fake_sweep(specs: list[TrialSpec], *args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return tune_driver.SweepOutcome(len(specs), 0, 0, 0.0, interrupted=True)

    monkeypatch.setattr(tune_driver, "run_sweep", fake_sweep)
    monkeypatch.setattr(early_ray, "checked_for_start", lambda *args: None)  # no Ray at all
    raw = _grid(tmp_path, scheduler={"metric": "train_loss"}, tracking={"tensorboard": {}})
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    main(["run", str(path), "--no-progress"])
    assert seen["scheduler"] == Scheduler(metric="train_loss")
    assert seen["tracking"] == {"tensorboard": tracking.TensorBoard()}
