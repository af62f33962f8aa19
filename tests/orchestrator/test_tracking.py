"""Through Ray, one sweep of two real tiny trials under ASHA with every tracker on: the
per-epoch results in Tune's files and ResultGrid, the hopeless trial stopped and
recorded, and what TensorBoard, MLflow and W&B (offline) received."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from orchestrator.expansion import expand
from orchestrator.grid import parse_grid
from orchestrator.records import RecordStore
from orchestrator.report.analysis import analyse
from orchestrator.report.tables import problems_display
from orchestrator.spec import TrialSpec
from orchestrator.tracking import mlflow_environment
from orchestrator.tune_driver import run_sweep
from tests.conftest import TINY_GRID

pytestmark = pytest.mark.ray

EPOCHS = 3


@dataclasses.dataclass
class Sweep:
    output: Path
    good: TrialSpec  # learns
    hopeless: TrialSpec  # the same trial at a learning rate of 1e-9
    records: pd.DataFrame
    mlflow_uri: str

    def trial_dir(self, spec: TrialSpec) -> Path:
        (folder,) = (self.output / "_tune").glob(f"*/{spec.trial_id}_*")
        return folder

    def results(self, spec: TrialSpec) -> list[dict[str, Any]]:
        lines = (self.trial_dir(spec) / "result.json").read_text().splitlines()
        return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sweep]:
    """One Ray session: the learning trial first (ASHA's rungs are filled by it), then
    the hopeless one, one at a time."""
    import ray

    tmp = tmp_path_factory.mktemp("tracking")
    output = tmp / "out"
    uri = f"file://{tmp / 'mlruns'}"
    raw = copy.deepcopy(TINY_GRID)
    raw.update(
        output=str(output),
        methods={"full": {}},
        train={"epochs": EPOCHS, "batch_size": 16, "lr": 3.0e-3},
        resources={"cpus_per_trial": 1, "max_concurrent": 1},
        scheduler={"name": "asha", "metric": "train_loss", "reduction_factor": 2},
        tracking={
            "tensorboard": {},
            "mlflow": {"tracking_uri": uri, "experiment": "tiny-tracking"},
            "wandb": {"mode": "offline", "project": "tiny"},
        },
    )
    raw["datasets"]["synthetic"]["val_fraction"] = 0.25
    grid = parse_grid(raw)
    (good,) = expand(grid)
    hopeless = dataclasses.replace(good, train=dataclasses.replace(good.train, lr=1e-9))
    # W&B's own settings and caches stay in the test's folder (the workers inherit them)
    env = {k: str(tmp / "wandb-home") for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR")}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    store = RecordStore(output)
    try:
        outcome = run_sweep(
            [good, hopeless],
            store,
            grid.resources,
            name=grid.name,
            show_progress=False,
            scheduler=grid.scheduler,
            tracking=grid.tracking,
        )
        assert outcome.recorded == 2 and outcome.crashed == 0
        yield Sweep(output, good, hopeless, store.collect(), uri)
    finally:
        for key, value in before.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        if ray.is_initialized():
            ray.shutdown()


def test_every_epoch_is_a_tune_result(sweep: Sweep) -> None:
    from ray.tune import ExperimentAnalysis, ResultGrid

    results = sweep.results(sweep.good)
    epochs = [r for r in results if "epoch" in r]
    assert [r["epoch"] for r in epochs] == list(range(1, EPOCHS + 1))
    for name in ("train_loss", "val_accuracy", "peak_mem_mb", "energy_j", "step_time_s"):
        assert all(isinstance(r[name], float) for r in epochs), name
    assert epochs[0]["train_loss"] > epochs[-1]["train_loss"]  # it learns
    last = results[-1]
    assert "epoch" not in last and last["status"] == "ok"
    record = sweep.records.set_index("trial_id").loc[sweep.good.trial_id]
    assert json.loads(last["record"])["trial_id"] == sweep.good.trial_id
    assert last["accuracy"] == pytest.approx(record["accuracy"])
    assert epochs[-1]["train_loss"] == pytest.approx(record["train_loss"])
    progress = pd.read_csv(sweep.trial_dir(sweep.good) / "progress.csv")
    assert list(progress["epoch"].dropna().astype(int)) == list(range(1, EPOCHS + 1))

    grid = ResultGrid(ExperimentAnalysis(str(sweep.trial_dir(sweep.good).parent)))
    assert len(grid) == 2
    by_epochs = {int(r.metrics_dataframe["epoch"].max()): r for r in grid}
    good = by_epochs.pop(EPOCHS)  # the stopped one ended before
    assert good.metrics["status"] == "ok" and good.metrics["accuracy"] == last["accuracy"]
    curve = good.metrics_dataframe.dropna(subset=["epoch"])
    assert curve["train_loss"].tolist() == pytest.approx([r["train_loss"] for r in epochs])
    (stopped,) = by_epochs.values()
    assert "record" not in stopped.metrics and stopped.metrics["epoch"] < EPOCHS


def test_asha_stops_the_hopeless_trial_and_it_is_recorded(sweep: Sweep) -> None:
    records = sweep.records.set_index("trial_id")
    good, stopped = records.loc[sweep.good.trial_id], records.loc[sweep.hopeless.trial_id]
    assert good["status"] == "ok"
    assert stopped["status"] == "stopped"
    assert "asha on train_loss" in stopped["error"] and f"of {EPOCHS}" in stopped["error"]
    assert 0 < stopped["steps"] < good["steps"]
    assert stopped["train_loss"] > good["train_loss"]
    assert pd.isna(stopped["accuracy"]) and stopped["val_accuracy"] >= 0
    last_epoch = [r for r in sweep.results(sweep.hopeless) if "epoch" in r][-1]
    assert stopped["train_loss"] == pytest.approx(last_epoch["train_loss"])
    # its memory and energy figures name their meters, as the finished trial's do
    assert stopped["peak_mem_mb"] == pytest.approx(last_epoch["peak_mem_mb"])
    for source in ("mem_source", "energy_source"):
        assert stopped[source] == good[source] == last_epoch[source] != ""
    assert "record" not in sweep.results(sweep.hopeless)[-1]

    # two configurations (their learning rates differ): only the ok one has figures, the
    # stopped one is no seed of any mean and is listed as a problem
    (config,) = analyse(sweep.records).configs.to_dict("records")
    assert (config["seeds"], config["trials"]) == (1, 1)
    assert config["config"].endswith("[lr=0.003]")
    for name in ("accuracy", "peak_mem_mb", "energy_j", "train_time_s"):
        assert config[name] == pytest.approx(good[name]), name
    problems = problems_display(sweep.records)
    assert list(problems["status"]) == ["stopped"]


def test_tensorboard_has_the_epoch_scalars(sweep: Sweep) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(sweep.trial_dir(sweep.good)))
    events.Reload()
    losses = events.Scalars("ray/tune/train_loss")
    epochs = [r for r in sweep.results(sweep.good) if "epoch" in r]
    # one point per epoch, then the record's (its last-epoch loss again)
    assert [e.step for e in losses][:EPOCHS] == list(range(1, EPOCHS + 1))
    assert [e.value for e in losses][:EPOCHS] == pytest.approx([r["train_loss"] for r in epochs])
    assert "ray/tune/accuracy" in events.Tags()["scalars"]


def test_mlflow_has_a_run_per_trial_named_by_its_label(
    sweep: Sweep, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    for key, value in mlflow_environment(sweep.mlflow_uri).items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(sweep.mlflow_uri)  # the driver's callback set it so already
    runs = mlflow.search_runs(experiment_names=["tiny-tracking"])
    assert sorted(runs["tags.mlflow.runName"]) == [sweep.good.label, sweep.hopeless.label]
    record = sweep.records.set_index("trial_id").loc[sweep.good.trial_id]
    good = runs[runs["metrics.accuracy"].notna()]
    assert len(good) == 1  # the stopped trial has no test accuracy
    assert good["metrics.accuracy"].iloc[0] == pytest.approx(record["accuracy"])
    client = mlflow.MlflowClient(tracking_uri=sweep.mlflow_uri)
    history = client.get_metric_history(good["run_id"].iloc[0], "val_accuracy")
    assert len(history) >= EPOCHS


def test_wandb_writes_an_offline_run_per_trial(sweep: Sweep) -> None:
    runs = sorted((sweep.output / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    for run in runs:
        (log,) = run.glob("run-*.wandb")
        data = log.read_bytes()
        assert b"train_loss" in data and b"val_accuracy" in data
        assert sweep.good.label.encode() in data  # the run's name (both share the label)
