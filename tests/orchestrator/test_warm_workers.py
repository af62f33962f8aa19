"""Warm workers: Tune's first trials start in the worker processes a local Ray started
before Tune asked for them, with the trial code imported already."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from ray import tune

from orchestrator.tune_driver import (
    RAYLET_CONNECT,
    _environment,
    _result_files,
    connect,
    disconnect,
    starts_local_ray,
)
from orchestrator.warm_workers import (
    KEEP_IDLE,
    PRELOAD,
    PRELOAD_MB,
    TRIAL_MODULES,
    TUNE_ACTOR_ENV,
    preload_config,
    tune_actors_on_warm_workers,
)

GIB = 2**30


def test_a_node_preloads_while_its_workers_take_a_tenth_of_its_memory() -> None:
    fits = int(16 * PRELOAD_MB * 2**20 / 0.1)  # 16 workers take exactly a tenth
    warm = {"preload_python_modules": list(PRELOAD), **KEEP_IDLE}
    assert preload_config(16, fits) == warm
    assert preload_config(17, fits) == KEEP_IDLE  # Tune's trials still take the workers
    assert preload_config(2, 24 * GIB) == warm
    assert preload_config(128, 256 * GIB) == KEEP_IDLE  # 50 GiB of idle workers


def test_the_environment_ray_starts_with_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    (key,) = TUNE_ACTOR_ENV
    monkeypatch.delenv(key, raising=False)
    with _environment(TUNE_ACTOR_ENV):
        assert os.environ[key] == TUNE_ACTOR_ENV[key]
    assert key not in os.environ
    monkeypatch.setenv(key, "0")
    with _environment(TUNE_ACTOR_ENV):
        assert os.environ[key] == TUNE_ACTOR_ENV[key]
    assert os.environ[key] == "0"


def _first_line(config: dict[str, Any]) -> None:
    """A trial reporting, from its first line, its worker process and whether the trial
    code was imported there already."""
    tune.report(
        {
            "pid": os.getpid(),
            "imported": all(m in sys.modules for m in config["modules"]),
            "pl_disable_fork": os.environ.get("PL_DISABLE_FORK", ""),
        }
    )


def _tune_trials(trials: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        tuner = tune.Tuner(
            tune.with_resources(_first_line, {"cpu": 1}),
            param_space={
                "modules": [*PRELOAD, *TRIAL_MODULES],
                "i": tune.grid_search(list(range(trials))),
            },
            tune_config=tune.TuneConfig(reuse_actors=False, max_concurrent_trials=trials),
            run_config=tune.RunConfig(storage_path=out, verbose=0, callbacks=_result_files()),
        )
        return [r.metrics for r in tuner.fit()]


@pytest.mark.parametrize("warm", [True, False])
def test_tune_trials_start_in_workers_started_before_tune(warm: bool) -> None:
    """With warm workers, both trials run in processes that existed before Tune was built
    and had the trial code imported; with Tune's own actor environment, in processes
    started after it."""
    assert connect().warm_workers  # a local Ray started here
    try:
        before_tune = _idle_ray_workers(2)
        with tune_actors_on_warm_workers(warm):
            metrics = _tune_trials(2)
    finally:
        disconnect()
    pids = {m["pid"] for m in metrics}
    assert all(m["pl_disable_fork"] == "1" for m in metrics)  # Tune's setting, either way
    assert all(m["imported"] for m in metrics)  # every worker of this Ray preloads
    assert len(pids) == 2 and len(before_tune) >= 2
    if warm:
        assert pids <= before_tune
    else:
        assert not pids & before_tune


def _idle_ray_workers(count: int) -> set[int]:
    """The worker processes of this process's Ray once ``count`` of them have connected
    to it (Ray titles them idle then, before they preload), the ones still starting
    included."""
    deadline = time.monotonic() + 60
    while True:
        workers = _ray_workers()
        if len(workers["idle"]) >= count or time.monotonic() > deadline:
            return workers["idle"] | workers["starting"]
        time.sleep(0.2)


def _ray_workers() -> dict[str, set[int]]:
    import psutil

    workers: dict[str, set[int]] = {"idle": set(), "starting": set()}
    for process in psutil.Process().children(recursive=True):  # the local Ray's processes
        with contextlib.suppress(psutil.Error):
            cmdline = process.cmdline() or [""]
            if cmdline[0] == "ray::IDLE":
                workers["idle"].add(process.pid)
            elif any(part.endswith("default_worker.py") for part in cmdline):
                workers["starting"].add(process.pid)
    return workers


@pytest.mark.parametrize("warm", [True, False])
def test_a_local_ray_asks_for_its_sockets_every_ten_milliseconds(warm: bool) -> None:
    """Every Ray that ``connect`` starts retries its raylet's connections every 10 ms
    (Ray's default, a second, made one start in two a second late); only a warm one
    preloads."""
    from ray._private.state import state

    connection = connect(warm_workers=warm)
    try:
        config = state.get_system_config()  # what the node's processes were given
    finally:
        disconnect()
    assert connection.warm_workers == warm
    assert RAYLET_CONNECT.items() <= config.items()
    assert ("preload_python_modules" in config) == warm


def test_tune_settings_come_back_after_the_run() -> None:
    from ray.tune.execution import class_cache

    before = dict(class_cache.DEFAULT_ENV_VARS)
    with tune_actors_on_warm_workers(True):
        assert not set(TUNE_ACTOR_ENV) & set(class_cache.DEFAULT_ENV_VARS)
    assert class_cache.DEFAULT_ENV_VARS == before
    assert set(TUNE_ACTOR_ENV) <= set(before)  # what Tune sets, checked against Tune itself


def test_a_job_with_shipped_modules_starts_no_warm_workers(tmp_path: Path) -> None:
    plugin = tmp_path / "warm_plugin.py"
    plugin.write_text("X = 1\n")
    try:
        assert not connect(py_modules=[str(plugin)]).warm_workers
    finally:
        disconnect()


def test_a_ray_to_join_gets_no_warm_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray refuses a system config when it joins a cluster (``RAY_ADDRESS``, ``ray
    start`` on this machine): only a Ray that ``connect`` starts itself preloads."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert starts_local_ray(None)
    assert not starts_local_ray("127.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not starts_local_ray(None)


CUDA_SPY = """
import importlib, sys, torch
asked = []
def spy(name, real):
    def call(*args, **kwargs):
        asked.append(name)
        return real(*args, **kwargs)
    return call
torch._C._cuda_getDeviceCount = spy("device count", torch._C._cuda_getDeviceCount)
torch.cuda._lazy_init = spy("init", torch.cuda._lazy_init)
for module in sys.argv[1:]:
    importlib.import_module(module)
print(",".join(asked) or "nothing")
"""


@pytest.mark.parametrize("modules", [PRELOAD, ("bitsandbytes",)])
def test_preloading_asks_nothing_of_cuda(modules: tuple[str, ...]) -> None:
    """A warm worker imports ``PRELOAD`` before Ray sets the GPUs of the trial it will
    run: nothing in it may count or initialise devices then (bitsandbytes, which does,
    shows that the check sees it)."""
    import subprocess

    out = (
        subprocess.run(
            [sys.executable, "-c", CUDA_SPY, *modules], capture_output=True, text=True, check=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    assert (out == "nothing") == (modules == PRELOAD), out


GC_SPY = """
import gc, importlib, sys
import ray  # a Ray worker has imported it before it preloads
collections = []
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info))
for module in sys.argv[1:]:
    importlib.import_module(module)
print(len(collections), gc.get_freeze_count(), gc.isenabled())
"""


@pytest.mark.parametrize("modules", [PRELOAD, TRIAL_MODULES])
def test_a_warm_worker_imports_the_trial_code_without_collections(
    modules: tuple[str, ...],
) -> None:
    """``PRELOAD`` imports ``TRIAL_MODULES`` with the cyclic collector paused and freezes
    what they made, leaving the collector on; imported plainly, the same modules set it
    off many times (so the check sees collections)."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", GC_SPY, *modules], capture_output=True, text=True, check=True
    ).stdout.split()
    collections, frozen, enabled = int(out[0]), int(out[1]), out[2]
    assert enabled == "True"
    if modules == PRELOAD:
        assert collections == 0 and frozen > 100_000, out
    else:
        assert collections > 10 and frozen == 0, out
