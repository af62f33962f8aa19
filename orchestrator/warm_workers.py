"""Warm workers: a local Ray's pre-started worker processes import the trial code while
the driver sets the sweep up, and Tune's trial actors start in them.

A local Ray starts one idle worker process per CPU before the first task. Left alone,
Tune never uses them: it gives its trial actors a runtime environment of their own
(``PL_DISABLE_FORK=1``, for PyTorch Lightning), and Ray only hands a worker to a task
whose runtime environment matches the one the worker was started with, so every first
trial waited for a fresh process and then for torch and Ray Tune (about 2.5 s of CPU
here; benchmarks/overhead.py). Here the workers get ``PL_DISABLE_FORK`` from the
environment Ray starts with (``orchestrator.tune_driver.connect``), Tune's actors none of
their own, and Ray's ``preload_python_modules`` imports ``PRELOAD`` in every worker as
it starts (``orchestrator.warm_import``: the trial code, ``TRIAL_MODULES``). Importing
it asks nothing of CUDA, which reads ``CUDA_VISIBLE_DEVICES`` once, when it is first
asked: after Ray has set it for the trial (a test checks).

Each warm worker holds about ``PRELOAD_MB`` of its own memory whether or not a trial
comes, so a node preloads only while all of them together take at most
``PRELOAD_SHARE`` of its available memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# torch and the trial code, Ray Tune and the trainable (not the plug-ins: the grid's own)
TRIAL_MODULES = ("workers.trial", "orchestrator.tune_driver")
# what Ray imports in a warm worker: TRIAL_MODULES, the collector paused meanwhile
PRELOAD = ("orchestrator.warm_import",)
PRELOAD_MB = 400  # private memory of a worker that imported PRELOAD (383 MiB measured)
PRELOAD_SHARE = 0.1  # of the node's available memory, at most, for all idle warm workers
TUNE_ACTOR_ENV = {"PL_DISABLE_FORK": "1"}  # what Tune sets on its actors (its class cache)
# Ray stops idle workers beyond the node's free CPUs once they have idled a second: when
# Tune's placement groups take the CPUs, a check in the few ms before Tune asks for its
# actors stopped the warm workers and started fresh ones (3 sweeps in 5 here, loaded). Idle
# workers beyond the free CPUs now stay up to 10 minutes (within the CPUs, Ray keeps
# them anyway).
KEEP_IDLE = {"idle_worker_killing_time_threshold_ms": 600_000}


def preload_config(cpus: int, available_bytes: int) -> dict[str, Any]:
    """Ray's system config for a local node of ``cpus`` CPUs (one pre-started worker
    each): ``KEEP_IDLE``, and the modules to preload unless they would take more than
    ``PRELOAD_SHARE`` of ``available_bytes``."""
    if cpus * PRELOAD_MB * 2**20 > PRELOAD_SHARE * available_bytes:
        return dict(KEEP_IDLE)
    return {"preload_python_modules": list(PRELOAD), **KEEP_IDLE}


def local_preload_config() -> dict[str, Any]:
    """``preload_config`` of this machine, as a local Ray would see it."""
    import psutil
    from ray._private.utils import get_num_cpus

    return preload_config(get_num_cpus(), psutil.virtual_memory().available)


@contextlib.contextmanager
def tune_actors_on_warm_workers(enabled: bool) -> Iterator[None]:
    """While Tune runs on a Ray started with ``TUNE_ACTOR_ENV`` in its environment, which
    its workers inherit (``enabled``): Tune's trial actors without ``TUNE_ACTOR_ENV`` as
    a runtime environment of their own. Tune still passes on the variables it forwards
    from this process when they are set (cloud credentials, its own settings); a trial
    then starts in a fresh worker, as before."""
    if not enabled:
        yield
        return
    from ray.tune.execution import class_cache  # no public setting exists

    before = dict(class_cache.DEFAULT_ENV_VARS)
    for key in TUNE_ACTOR_ENV:
        class_cache.DEFAULT_ENV_VARS.pop(key, None)
    try:
        yield
    finally:
        class_cache.DEFAULT_ENV_VARS.clear()
        class_cache.DEFAULT_ENV_VARS.update(before)
