"""``orchestrate run`` starts its local Ray while the grid's backbones are built
(``orchestrator.early_ray``): the two overlap, a grid in error stops that Ray, and only
a fresh local sweep whose grid passes the checks that build nothing gets it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray

from orchestrator import cli, early_ray, tune_driver
from orchestrator.cli import main
from orchestrator.grid import GridError

WAIT_S = 30.0  # for the other thread; a sequential run would wait this long, then fail


def _spy_disconnect(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> None:
    monkeypatch.setattr(tune_driver, "disconnect", lambda: events.append("disconnect"))


def test_validation_runs_in_a_thread_beside_the_start_in_the_main_thread() -> None:
    """Each waits for the other to have begun: done one after the other, this fails."""
    validating, starting = threading.Event(), threading.Event()
    threads: dict[str, str] = {}

    def validate() -> str:
        threads["validate"] = threading.current_thread().name
        validating.set()
        assert starting.wait(WAIT_S)
        return "grid"

    def start() -> Any:
        threads["start"] = threading.current_thread().name
        starting.set()
        assert validating.wait(WAIT_S)
        return "connection"

    got = early_ray.validate_while_starting(validate, start, lambda grid: grid == "grid")
    assert got == ("grid", "connection")
    assert threads == {"validate": "grid-validation", "start": threading.main_thread().name}


def test_a_grid_in_error_stops_the_ray_before_its_error_is_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[str] = []
    _spy_disconnect(monkeypatch, events)

    def validate() -> Any:
        raise GridError("g.yaml", "backbones.vit_test", "cannot be built")

    def start() -> Any:
        events.append("started")
        return "connection"

    with pytest.raises(GridError, match="cannot be built"):
        early_ray.validate_while_starting(validate, start, lambda grid: True)
    assert events == ["started", "disconnect"]


def test_a_ray_that_fails_to_start_is_left_to_the_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    _spy_disconnect(monkeypatch, events)

    def start() -> Any:
        raise RuntimeError("no room for the object store")

    got = early_ray.validate_while_starting(lambda: "grid", start, lambda grid: True)
    assert got == ("grid", None)
    assert events == ["disconnect"]  # whatever part of it started


def test_a_grid_that_asks_for_another_ray_than_the_one_started_gets_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The file changed between its two reads: the sweep starts the Ray it asks for."""
    events: list[str] = []
    _spy_disconnect(monkeypatch, events)
    got = early_ray.validate_while_starting(lambda: "grid", lambda: "ray", lambda grid: False)
    assert got == ("grid", None)
    assert events == ["disconnect"]


# ---------------------------------------------------------------- which sweeps get it


@pytest.fixture
def local_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process would start a local Ray (whatever Ray an earlier test left)."""
    monkeypatch.setattr(tune_driver, "starts_local_ray", lambda address: address is None)


def test_a_fresh_local_sweep_is_checked_without_building_a_backbone(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    local_start: None,
) -> None:
    from workers.backbones import _checked

    tiny_grid["backbones"] = {"vit_test": {"img_size": 16, "model_args": {"num_heads": 3}}}
    path = write_grid(tiny_grid)
    _checked.cache_clear()
    checked = early_ray.checked_for_start(str(path), 100, None)
    assert checked is not None and checked[0].output == tiny_grid["output"]
    assert _checked.cache_info().currsize == 0  # nothing built: the error is not seen yet
    assert not Path(tiny_grid["output"]).exists()


@pytest.mark.parametrize(
    "case", ["grid error", "all excluded", "records", "object store", "cluster", "trial limit"]
)
def test_other_sweeps_validate_first(
    case: str,
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    local_start: None,
) -> None:
    address, limit = None, 100
    if case == "grid error":
        tiny_grid["methods"] = {"lorax": {}}
    elif case == "all excluded":
        tiny_grid["exclude"] = [{"method": ["full", "bitfit"]}]
    elif case == "records":
        (Path(tiny_grid["output"]) / "records").mkdir(parents=True)
    elif case == "object store":
        tiny_grid["output"] = "s3://bucket/sweeps/tiny"
    elif case == "cluster":
        address = "127.0.0.1:6379"
    else:
        limit = 1
    assert early_ray.checked_for_start(str(write_grid(tiny_grid)), limit, address) is None


# ---------------------------------------------------------------- the command, with Ray


def _watch(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> None:
    """Note the command's full validation and Ray's start; the validation begins only
    once Ray's start has (a command that validated first would wait here, then fail)."""
    validate, connect = cli.validate_grid, tune_driver.connect
    connecting = threading.Event()

    def watched_validate(*args: Any, **kwargs: Any) -> Any:
        assert connecting.wait(WAIT_S), "Ray's start did not begin beside the validation"
        try:
            return validate(*args, **kwargs)
        finally:
            events.append("validated")

    def watched_connect(*args: Any, **kwargs: Any) -> Any:
        events.append("connecting")
        connecting.set()
        try:
            return connect(*args, **kwargs)
        finally:
            events.append("connected")

    monkeypatch.setattr(cli, "validate_grid", watched_validate)
    monkeypatch.setattr(tune_driver, "connect", watched_connect)


def test_a_grid_that_fails_only_when_built_exits_2_with_its_ray_stopped(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tune_driver.disconnect()  # a Ray an earlier test left: this command starts its own
    events: list[str] = []
    _watch(monkeypatch, events)
    tiny_grid["backbones"] = {"vit_test": {"img_size": 16, "model_args": {"num_heads": 3}}}
    path = write_grid(tiny_grid)

    assert main(["run", str(path), "--no-progress", "--no-dashboard"]) == 2
    err = capsys.readouterr().err
    assert err.count(f"orchestrate: error: {path}: backbones.vit_test: ") == 1  # shown once
    assert "cannot be built" in err
    assert sorted(events) == ["connected", "connecting", "validated"]  # Ray started beside
    assert not ray.is_initialized()  # and was stopped
    assert not Path(tiny_grid["output"]).exists()  # nothing written


def test_a_sweep_runs_on_the_ray_started_while_its_grid_was_validated(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tune_driver.disconnect()
    events: list[str] = []
    _watch(monkeypatch, events)
    sweeps: list[Any] = []
    run_sweep = tune_driver.run_sweep

    def watched_sweep(*args: Any, **kwargs: Any) -> Any:
        sweeps.append(kwargs["connection"])
        return run_sweep(*args, **kwargs)

    monkeypatch.setattr(tune_driver, "run_sweep", watched_sweep)
    tiny_grid["methods"] = {"bitfit": {}}
    try:
        assert main(["run", write_grid(tiny_grid).as_posix(), "--no-progress"]) == 0
    finally:
        tune_driver.disconnect()
    assert "ran 1 of 1 trials" in capsys.readouterr().out
    assert sorted(events) == ["connected", "connecting", "validated"]  # one start, used
    assert sweeps[0] is not None and sweeps[0].warm_workers  # a local Ray, warm workers
