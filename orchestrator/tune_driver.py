"""Ray Tune driver: the only module that talks to Ray Tune.

One Tune trial per TrialSpec, each with explicit resources, at most
``max_concurrent`` at once. Every dataset of the sweep is decoded once, here, and
put in the Ray object store; trials map it from their node's store (zero-copy)
instead of reading it from disk. The trial reports flat figures after every epoch
(``orchestrator.tune_metrics``: Tune's result files, schedulers and trackers read them),
then its TrialRecord as JSON; a callback in this (driver) process hands it to a group
commit the moment it arrives (``orchestrator.group_commit``: written within about a
second by a thread of its own, never on Tune's event loop; all durable before
``run_sweep`` returns), so the records on disk are always trials that finished. A
trial whose process dies without reporting still gets a ``failed`` record with Ray's
error text; one that the grid's scheduler stops, a ``stopped`` record with the figures
of its last epoch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from orchestrator.grid import Resources
from orchestrator.group_commit import GroupCommit
from orchestrator.records import RecordStore, TrialRecord, WriteError
from orchestrator.scheduler import SCHEDULERS, Scheduler
from orchestrator.spec import TrialSpec
from orchestrator.tracking import mlflow_environment, mlflow_uri, wandb_mode
from orchestrator.tune_metrics import epoch_result, final_result, latest_line, stopped_record
from orchestrator.warm_workers import (
    TUNE_ACTOR_ENV,
    local_preload_config,
    tune_actors_on_warm_workers,
)

log = logging.getLogger(__name__)

# Tune's own settings while it runs: no status tables (we draw our own bar), and no
# SIGINT handler of its own (it would swallow Ctrl-C and advise `Tuner.restore`): the
# command owns SIGINT and SIGTERM (orchestrator.signals) and stops Tune by a Stopper.
# No strict metric check: a baseline, or a trial that fails before its first epoch,
# reports a record without the scheduler's metric (the schedulers skip such results).
TUNE_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    # Tune's result files come from ``_result_files``; TensorBoard's event files only
    # with the grid's ``tracking: {tensorboard: ...}`` (Tune would add them always)
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}


@dataclass
class SweepOutcome:
    """What happened to the trials handed to ``run_sweep``."""

    submitted: int
    recorded: int
    crashed: int  # trials whose process died before reporting (recorded as failed)
    wall_time_s: float
    interrupted: bool = False  # stopped on request before every trial ended


ARTIFACTS = "artifacts"  # OUTPUT/artifacts/<trial_id>/: files a trial's deployment exports


def _trainable(config: dict[str, Any], shared: dict[str, Any]) -> None:
    """Runs inside a Ray worker process: one spec in, a result per epoch, then one record.
    A scheduler's stop ends the trial inside ``tune.report`` (Tune exits its thread)."""
    spec = TrialSpec.from_json(config["spec"])
    live = LiveMetrics(spec)

    def progress(figures: dict[str, float]) -> None:
        live(figures)
        result = epoch_result(figures)
        if result is not None:
            tune.report(result)

    record = _run_spec(spec, config, shared, progress)
    tune.report(final_result(record))


def _run_spec(
    spec: TrialSpec,
    config: dict[str, Any],
    shared: dict[str, Any],
    progress: Callable[[dict[str, float]], None],
) -> TrialRecord:
    """The body of every trial in a Ray worker (a Tune trial or a search task): the
    plug-ins imported, the dataset from the object store when the driver shared it,
    then ``run_trial``."""
    from workers.plugins import PluginError, load_plugins

    try:  # before anything reads a registry: they add names to them
        load_plugins(config.get("plugins", ()))
    except PluginError as exc:  # validated on the driver: this worker's environment lacks it
        record = TrialRecord(spec=spec, status="failed", error=f"plug-in {exc}")
        record.node_id = ray.get_runtime_context().get_node_id()
        return record

    from workers.data import from_shared, shared_key
    from workers.energy import EnergyConfig
    from workers.trial import run_trial

    ref = shared.get(shared_key(spec.dataset, spec.dataset_args))
    provider = None if ref is None else lambda: (from_shared(ray.get(ref)), "object_store")
    record = run_trial(
        spec,
        num_threads=config["threads"],
        data=provider,
        energy=EnergyConfig(**config["energy"]),
        exclusive=gpu_exclusive(config["gpus"][str(spec.budget_mb)]),
        progress=progress,
        artifacts_dir=f"{config['artifacts']}/{spec.trial_id}" if config.get("artifacts") else None,
        epoch_validation=config.get("epoch_validation", False),
    )
    record.node_id = ray.get_runtime_context().get_node_id()
    return record


class LiveMetrics:
    """A trial's live figures as Ray metrics (gauges tagged with the trial id and its
    label), shown by the Ray dashboard's metrics view (Prometheus + Grafana)."""

    DESCRIPTIONS = {
        "step": "optimizer steps taken",
        "loss": "training loss of the last step",
        "peak_mem_mb": "peak memory so far, MiB (CUDA allocator, or accounted on CPU)",
        "energy_j": "energy of the training loop so far, J",
    }

    def __init__(self, spec: TrialSpec) -> None:
        from ray.util.metrics import Gauge

        self.tags = {"trial_id": spec.trial_id, "trial": spec.label}
        self.gauges = {
            name: Gauge(f"vramsweep_trial_{name}", description=doc, tag_keys=tuple(self.tags))
            for name, doc in self.DESCRIPTIONS.items()
        }

    def __call__(self, figures: dict[str, float]) -> None:
        """Set the gauges of the figures given (others, e.g. per-epoch ones, are not gauges)."""
        for name, gauge in self.gauges.items():
            if name in figures:
                gauge.set(float(figures[name]), tags=self.tags)


def gpu_exclusive(gpus_per_trial: float) -> bool | None:
    """Whether a trial holds its GPU alone: a whole GPU (or more) yes, a fraction no
    (its energy is a share); None for CPU trials (the scheduler cannot tell)."""
    if gpus_per_trial <= 0:
        return None
    return gpus_per_trial >= 1


def gpu_share(budget_mb: float, gpu_mb: float, context_mb: float) -> float:
    """GPUs for one trial: 1/k for the largest k such that k trials, each with its
    memory budget and its own CUDA context, fit in one GPU's memory.

    Example: a 2048 MiB budget and a 500 MiB context on an 80 GiB GPU: 1/32.
    """
    per_trial = budget_mb + context_mb
    k = int(gpu_mb // per_trial)
    if k < 1:
        raise ValueError(
            f"a trial needs {per_trial:.0f} MiB (budget {budget_mb:g} + CUDA context "
            f"{context_mb:.0f}) but a GPU of this cluster has {gpu_mb:.0f} MiB"
        )
    return 1.0 / k


MIB = 1024 * 1024


def memory_request(budget_mb: float, gpus: float, device: str = "auto") -> int:
    """Bytes of host memory a trial reserves on its node (Ray's ``memory`` resource), so
    that trials run at once on one node only while their limits together fit it.

    A trial on the CPU (no GPU share, or ``train.device: cpu``) reserves its resident-memory
    limit: its budget plus the stated margin at which ``RssGuard`` stops it
    (``workers.rss_limit``; the worker's idle baseline, ~1.6 GiB with torch, is outside).
    A GPU trial's budget is device memory, held by its GPU share: it reserves none.
    """
    if gpus > 0 and device != "cpu":
        return 0
    from workers.rss_limit import rss_limit_mb

    return int(rss_limit_mb(budget_mb) * MIB)


def node_memory() -> list[float]:
    """Ray's ``memory`` resource of every live node, bytes."""
    return [float(n["Resources"].get("memory", 0.0)) for n in ray.nodes() if n.get("Alive")]


def check_memory(requests: dict[float, int], nodes: Sequence[float]) -> None:
    """Fail early when a trial's memory request (by budget, MiB) exceeds every node's."""
    largest = max(nodes, default=0.0)
    for budget, request in sorted(requests.items()):
        if request > largest:
            raise ValueError(
                f"budget_mb={budget:g}: a CPU trial reserves {request / MIB:.0f} MiB of host "
                f"memory (its budget + the RSS margin) but the largest Ray node has "
                f"{largest / MIB:.0f} MiB (its `memory` resource)"
            )


@ray.remote(num_gpus=1, num_cpus=0)
def _probe_gpu() -> tuple[float, float]:
    """On a GPU node: (GPU memory, CUDA context of a process), MiB."""
    from workers.memory import cuda_context_probe

    return cuda_context_probe()


def gpus_per_budget(
    budgets_mb: set[float],
    resources: Resources,
    energy: dict[str, Any],
    cluster_gpus: float,
    probe: Callable[[], tuple[float, float]] | None = None,
) -> dict[str, float]:
    """GPUs each trial asks for, by its budget (``str(budget_mb)``): the grid's number;
    for ``auto``, packed by ``gpu_share`` from ``probe`` (default: ``_probe_gpu`` on a
    GPU node; 0 without GPUs); a whole GPU when the grid asks for exclusive energy."""
    if energy.get("exclusive") and cluster_gpus:
        return {str(b): 1.0 for b in budgets_mb}
    if resources.gpus_per_trial != "auto":
        return {str(b): float(resources.gpus_per_trial) for b in budgets_mb}
    if not cluster_gpus:
        return {str(b): 0.0 for b in budgets_mb}
    gpu_mb, context_mb = probe() if probe else ray.get(_probe_gpu.remote())
    shares = {str(b): gpu_share(b, gpu_mb, context_mb) for b in budgets_mb}
    log.info("GPU %.0f MiB, CUDA context %.0f MiB: GPUs per trial %s", gpu_mb, context_mb, shares)
    return shares


def share_datasets(specs: Sequence[TrialSpec]) -> dict[str, Any]:
    """Decode each dataset of ``specs`` once and put it in the object store.

    Returns ``shared_key -> ObjectRef``. A dataset that cannot be loaded here is left
    out (logged): its trials load it themselves and record the error as data.
    """
    from workers.data import load_source, shared_key, to_shared

    refs: dict[str, Any] = {}
    for spec in specs:
        key = shared_key(spec.dataset, spec.dataset_args)
        if key in refs:
            continue
        try:
            data, how = load_source(spec.dataset, spec.dataset_args)
        except Exception as exc:  # noqa: BLE001 - the trials will record it
            log.warning("dataset %s not shared: %s", spec.dataset, exc)
            refs[key] = None
            continue
        refs[key] = ray.put(to_shared(data))
        log.info(
            "dataset %s (%s, %.1f MiB) in the object store", spec.dataset, how, data.nbytes / 2**20
        )
    return {k: v for k, v in refs.items() if v is not None}


def _trial_name(trial: Any) -> str:
    """A trial's folder name: its id and label."""
    spec = TrialSpec.from_json(trial.config["spec"])
    return f"{spec.trial_id}_{spec.label.replace('/', '_')}"


def _trial_label(trial: Any) -> str:
    """A trial's name in Tune (``str(trial)``): the run name the trackers show."""
    return TrialSpec.from_json(trial.config["spec"]).label


class _Recorder(tune.Callback):
    """Hands each reported record to a group commit (``GroupCommit``: written off Tune's
    event loop, durable by ``close``) and keeps the progress bar current (with the
    running trials' latest epoch and ``metric``). A trial that the ``scheduler`` stopped
    gets a ``stopped`` record from its last epoch's result. A record that cannot be
    written (``write_error``) stops the sweep, as does ``should_stop``; once stopping, a
    trial that ends in error or is stopped was cancelled: it gets no record."""

    def __init__(
        self,
        store: RecordStore,
        total: int,
        show_progress: bool,
        should_stop: Callable[[], bool] = lambda: False,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.store = store
        self.should_stop = should_stop
        self.scheduler = scheduler
        self.latest: dict[str, tuple[str, dict[str, Any]]] = {}  # Tune id -> label, result
        self.commit = GroupCommit(store)
        self.written: set[str] = set()  # trial ids handed to the commit (durable by close)
        self.recovered: dict[str, int] = {}  # Tune trial id -> times it was run again
        self.running = 0
        self.done = 0
        self.bad = 0
        self.crashed = 0
        self.bar = None
        if show_progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="trial", desc="sweep", dynamic_ncols=True)

    def _refresh(self) -> None:
        if self.bar is not None:
            metric = self.scheduler.metric if self.scheduler else None
            latest = "; ".join(latest_line(*v, metric) for v in self.latest.values())
            self.bar.set_postfix(
                running=self.running, not_ok=self.bad, latest=latest[:400], refresh=False
            )
            self.bar.n = self.done
            self.bar.refresh()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running += 1
        self._refresh()

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if "record" not in result:
            if "epoch" in result:
                self.latest[trial.trial_id] = (_trial_label(trial), dict(result))
                self._refresh()
            return
        record = TrialRecord.from_json(result["record"])
        record.attempt = self.recovered.get(trial.trial_id, 0) + 1
        if not self._write(record, others_running=self.running > 1):  # it still runs
            return
        if record.status != "ok":
            self.bad += 1
        log.info("%s %s: %s", record.trial_id, record.spec.label, record.status)

    def __getstate__(self) -> dict[str, Any]:
        """What Tune pickles of this callback with its experiment state, again and again
        while it runs (for a ``Tuner.restore`` that the command never does): the counts,
        not the store (its cached tables, changed by the commit's thread meanwhile), the
        commit, the bar or ``should_stop`` (the caller's: the command's reaches the signal
        handlers it replaced, which need not pickle, e.g. one a Tune run before it in the
        same process left with a lock)."""
        return {k: v for k, v in self.__dict__.items() if k not in self._UNPICKLED}

    _UNPICKLED = ("store", "commit", "bar", "should_stop")

    @property
    def write_error(self) -> WriteError | None:
        """The first record write that failed (nothing is written after it)."""
        return self.commit.error

    def _write(self, record: TrialRecord, others_running: bool) -> bool:
        try:  # a record that no other trial's is to follow soon is not held back
            self.commit.put(record, more_coming=others_running)
        except WriteError:
            return False
        self.written.add(record.trial_id)
        return True

    def stopping(self) -> bool:
        """The sweep is to end now (the Tune stopper asks)."""
        return self.write_error is not None or self.should_stop()

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """The trial's worker process or node died: Tune runs it again from scratch."""
        self.recovered[trial.trial_id] = self.recovered.get(trial.trial_id, 0) + 1
        log.warning(
            "%s: its worker or node died; running it again (retry %d)",
            _trial_name(trial),
            self.recovered[trial.trial_id],
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running -= 1
        self.done += 1
        _, last = self.latest.pop(trial.trial_id, ("", None))
        spec = TrialSpec.from_json(trial.config["spec"])
        if last is not None and spec.trial_id not in self.written and not self.stopping():
            self._stopped(trial, spec, last)  # it ended without its record: a scheduler's stop
        self._refresh()

    def _stopped(self, trial: Any, spec: TrialSpec, last: dict[str, Any]) -> None:
        how = f"{self.scheduler.name} on {self.scheduler.metric}" if self.scheduler else "Tune"
        record = stopped_record(spec, last, f"stopped early by the scheduler ({how})")
        record.attempt = self.recovered.get(trial.trial_id, 0) + 1
        if self._write(record, others_running=self.running > 0):
            self.bad += 1
            log.info("%s %s: stopped", record.trial_id, spec.label)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running -= 1
        self.done += 1
        self.latest.pop(trial.trial_id, None)
        spec = TrialSpec.from_json(trial.config["spec"])
        if spec.trial_id not in self.written and not self.stopping():
            error = _trial_error(trial)
            failed = TrialRecord(spec=spec, status="failed", error=f"ray: {error}")
            if self._write(failed, others_running=self.running > 0):
                self.crashed += 1
                self.bad += 1
        self._refresh()

    def close(self) -> None:
        """Make every record handed over durable (a failure stays in ``write_error``)."""
        self.commit.close()
        if self.bar is not None:
            self.bar.close()


def _trial_error(trial: Any) -> str:
    """What Tune recorded of a trial's failure (e.g. Ray's out-of-memory killer's report).

    Read from the trial's local error file, written before the callback runs; Tune's
    ``get_error()`` reads the synced copy in the storage folder, which may not be there yet.
    """
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        with contextlib.suppress(OSError):
            text = Path(path).read_text(errors="replace").strip()
            if text:
                return text
    return str(trial.get_error() or "the trial process ended without reporting a result")


class _StopAll(tune.Stopper):
    """Stops every trial, and starts no other, once ``stop()`` is true."""

    def __init__(self, stop: Callable[[], bool]) -> None:
        self.stop = stop

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.stop()


def _tune_environment(extra: dict[str, str] | None = None) -> contextlib.AbstractContextManager:
    """``TUNE_ENV`` (and ``extra``: the trackers' settings) while Tune is built and runs
    (Tune and the trackers read it then), as it was after."""
    return _environment({**TUNE_ENV, **(extra or {})})


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment (and so in that of the processes it
    starts) while the block runs, as it was after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# A local Ray's raylet connects to its own object store (and every worker to the raylet)
# through a socket, and when it asks before the other side listens, Ray waits a second
# before it asks again: 326 of 1,030 local starts here (Ray's logs). Asking every 10 ms,
# 1,000 times, gives up after the same 10 s; none of 148 starts since waited there.
RAYLET_CONNECT = {
    "raylet_client_connect_timeout_milliseconds": 10,
    "raylet_client_num_connect_attempts": 1000,
}


@dataclass(frozen=True)
class Connection:
    """The Ray cluster a sweep runs on."""

    resources: dict[str, float]  # the cluster's total resources (CPU, GPU, custom)
    dashboard_url: str  # "" when the dashboard does not run
    warm_workers: bool = False  # a local Ray started here (orchestrator.warm_workers)


def connect(
    address: str | None = None,
    dashboard: bool = False,
    py_modules: Sequence[str] = (),
    object_store_mb: float = 0,
    warm_workers: bool = True,
) -> Connection:
    """Start a local Ray (``address=None``) or join a cluster (``auto``, ``HOST:PORT``,
    ``ray://HOST:PORT``); a process already connected stays on its Ray. ``dashboard``
    starts the dashboard of a local Ray. ``py_modules``: local package folders and
    ``.py`` files that every worker of the job can import (the plug-ins that are not
    installed: ``workers.plugins.shipped_paths``), shipped by Ray's runtime environment.
    ``object_store_mb`` sizes a local Ray's object store (0: Ray's default); its ``memory``
    resource is the rest of the node's available memory. ``warm_workers``: a local Ray's
    pre-started workers import the trial code and take Tune's trials
    (``orchestrator.warm_workers``; not where plug-ins are shipped).

    A local Ray listens on 127.0.0.1 only (``_loopback_node``) and retries its sockets
    every 10 ms (``RAYLET_CONNECT``); a cluster of one's own (``ray start --head``,
    joined with ``address``) listens where it was told to."""
    if address and not ray.is_initialized():
        _use_token_if_available()
    if py_modules and ray.is_initialized():
        log.warning(
            "Ray was initialised before in this process, so %s cannot be shipped to its "
            "workers; trials whose worker cannot import them are recorded as failed",
            ", ".join(py_modules),
        )
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    store_bytes = int(object_store_mb * MIB) if object_store_mb and not address else None
    local = not address and not ray.is_initialized()
    starts = starts_local_ray(address)
    # warm workers: only where a worker can run a trial without a job runtime environment
    warm = warm_workers and not py_modules and starts
    # a Ray that joins refuses a system config
    system = {**RAYLET_CONNECT, **(local_preload_config() if warm else {})} if starts else None
    # the workers' environment is the one Ray starts with: Tune's setting for its actors
    with (
        _loopback_node(local),
        _prompt_registration(starts),
        _sigterm_kept(handlers[signal.SIGTERM]),
        _environment(TUNE_ACTOR_ENV if warm else {}),
    ):
        context = ray.init(
            address=address,
            runtime_env={"py_modules": list(py_modules)} if py_modules else None,
            include_dashboard=dashboard if not address else None,
            object_store_memory=store_bytes,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=False,
            ignore_reinit_error=True,  # already connected: the context of that connection
            _system_config=system,
        )
    _reinstall(handlers)
    url = getattr(context, "dashboard_url", "") or ""
    url = f"http://{url}" if url and "://" not in url else url
    return Connection(ray.cluster_resources(), url, warm_workers=warm)


def starts_local_ray(address: str | None) -> bool:
    """Whether ``ray.init(address)`` in this process starts a Ray of its own: not
    connected yet, and neither ``address``, ``RAY_ADDRESS`` nor a Ray started on this
    machine by ``ray start`` names one to join (Ray's own lookup, which is private)."""
    if address or ray.is_initialized():
        return False
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(None) is None


def disconnect() -> None:
    """Leave Ray: a local Ray stops with its processes; on a cluster, this driver's
    worker processes (its running trials) end."""
    if ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def _loopback_node(local: bool) -> Iterator[None]:
    """While a local Ray starts: a node address of 127.0.0.1, so that its gRPC servers,
    dashboard, dashboard agent and Prometheus metrics endpoints (of the dashboard, the
    autoscaler and the node's agent) listen on loopback, not on every interface.

    On Linux Ray gives a new node the machine's routable address even when told
    ``_node_ip_address="127.0.0.1"`` (it "resolves" localhost), and binds the metrics
    endpoints to all interfaces unless the node address is loopback. Its private constant
    ``ENABLE_RAY_CLUSTER`` (off on macOS and Windows, where Ray runs exactly so) is what
    makes it keep the loopback address; tests/orchestrator/test_driver_faults.py reads the
    listening sockets and fails if this stops working."""
    if not local:
        yield
        return
    from ray._private import ray_constants  # see above: no public setting exists

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


REGISTRATION_POLL_S = 0.02  # how often a local Ray's start asks whether its node is up
REGISTRATION_POLL_FOR_S = 10.0  # and for how long, before Ray's own asks take over


@contextlib.contextmanager
def _prompt_registration(starts: bool) -> Iterator[None]:
    """While a local Ray starts (``starts``): ``ray.init`` learns that its node has
    registered within ``REGISTRATION_POLL_S`` of it, not up to a second later.

    ``ray.init`` asks the GCS for its new node 0.1 s after starting the raylet and then
    once a second (Ray's ``GetNode`` sleeps a whole second between asks), and the raylet
    registers when its dashboard agent is up, 1.1-1.6 s after it starts here: most starts
    waited most of a second for nothing. Ray's private ``services.get_node`` (no public
    setting exists), which ``ray.init`` calls for it, first waits here, asking every
    ``REGISTRATION_POLL_S`` for up to ``REGISTRATION_POLL_FOR_S``; a node not up by then
    is left to Ray's own wait (30 s) and error. tests/orchestrator/test_ray_start.py
    fails if ``ray.init`` stops calling it."""
    if not starts:
        yield
        return
    from ray._private import services

    ray_get_node = services.get_node

    def get_node(gcs_address: str, node_id: str) -> dict:
        _await_registration(gcs_address, node_id)
        return ray_get_node(gcs_address, node_id)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = ray_get_node


def _await_registration(
    gcs_address: str, node_id: str, timeout_s: float = REGISTRATION_POLL_FOR_S
) -> bool:
    """Whether the node ``node_id`` is alive in the GCS at ``gcs_address`` within
    ``timeout_s`` (asked every ``REGISTRATION_POLL_S``)."""
    from ray._raylet import GcsClient, NodeID
    from ray.core.generated.gcs_pb2 import GcsNodeInfo
    from ray.core.generated.gcs_service_pb2 import GetAllNodeInfoRequest

    client = GcsClient(address=gcs_address)
    selector = GetAllNodeInfoRequest.NodeSelector(node_id=NodeID.from_hex(node_id).binary())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # the GCS not answering yet: ask again
            alive = client.get_all_node_info(
                timeout=1, node_selectors=[selector], state_filter=GcsNodeInfo.ALIVE
            )
            if alive:
                return True
        time.sleep(REGISTRATION_POLL_S)
    return False


@contextlib.contextmanager
def _sigterm_kept(handler: Any) -> Iterator[None]:
    """While ``ray.init`` runs in a process with a SIGTERM handler of its own (``handler``,
    a Python function: the command's, ``orchestrator.signals``): Ray does not put its
    own in its place (``sys.exit(15)`` on its first line), so a SIGTERM while Ray starts
    is the command's clean stop (exit 143), until Ray's core worker connects at its end:
    the fatal-signal handler that installs is replaced right after (``_reinstall``). A
    process without one keeps Ray's."""
    if not callable(handler):
        yield
        return
    from ray._private import utils  # no public setting exists

    before = utils.set_sigterm_handler
    utils.set_sigterm_handler = lambda ray_handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = before


def _reinstall(handlers: dict[int, Any]) -> None:
    """Give back SIGINT and SIGTERM to the handlers the process had before ``ray.init``:
    Ray's core worker installs a fatal-signal handler for SIGTERM (a C++ abort, rc 134)
    over the command's own (orchestrator.signals)."""
    for signum, handler in handlers.items():
        with contextlib.suppress(ValueError, TypeError):  # not the main thread; a C handler
            signal.signal(signum, handler)


def token_auth_enabled() -> bool:
    """Whether this process talks to Ray with token authentication (after ``connect``).
    Ray has no public call for it; its own check is private (tested in
    tests/orchestrator/test_driver_faults.py, which fails if it moves)."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return bool(is_token_auth_enabled())


def announce_dashboard(connection: Connection) -> None:
    """Print where the dashboard is, and how to get in when it wants a token."""
    if not connection.dashboard_url:
        return
    token = " (token authentication: `ray get-auth-token` prints the token)"
    print(f"Ray dashboard: {connection.dashboard_url}{token if token_auth_enabled() else ''}")


def _use_token_if_available() -> None:
    """Join with token authentication when this machine has the cluster's token.

    A head started by ``ray start`` turns token authentication on by itself when a
    token exists (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN[_PATH]``), but a process that
    joins it does so only in token mode. This is the head's own rule, applied to the
    driver; an explicit ``RAY_AUTH_MODE`` is left as it is.
    """
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def check_resources(resources: Resources, cluster: dict[str, float]) -> None:
    """Fail early when no node can ever host a trial (Tune would wait forever)."""
    if resources.cpus_per_trial > cluster.get("CPU", 0):
        raise ValueError(
            f"resources.cpus_per_trial={resources.cpus_per_trial} but the Ray cluster has "
            f"{cluster.get('CPU', 0):g} CPUs"
        )
    if resources.gpus_per_trial != "auto" and resources.gpus_per_trial > cluster.get("GPU", 0):
        raise ValueError(
            f"resources.gpus_per_trial={resources.gpus_per_trial:g} but the Ray cluster has "
            f"{cluster.get('GPU', 0):g} GPUs"
        )


def run_sweep(
    specs: Sequence[TrialSpec],
    store: RecordStore,
    resources: Resources,
    *,
    name: str,
    energy: dict[str, Any] | None = None,
    plugins: Sequence[str] = (),
    address: str | None = None,
    dashboard: bool = False,
    show_progress: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    scheduler: Scheduler | None = None,
    tracking: dict[str, Any] | None = None,
    connection: Connection | None = None,
) -> SweepOutcome:
    """Run ``specs`` through Ray Tune, writing one record per trial into ``store``.

    ``energy`` is the grid's ``energy:`` section (the meter each trial uses); ``plugins``
    the grid's plug-in modules, imported here already, shipped to the workers when they
    are not installed, and imported there before each trial. Once ``should_stop()`` is
    true (a SIGINT), running trials are cancelled without a record, no other starts, and
    the outcome says ``interrupted``. A record that cannot be written stops the sweep
    the same way and is raised (``WriteError``) once it has stopped. ``scheduler`` and
    ``tracking`` are the grid's sections of those names (``orchestrator.scheduler``,
    ``orchestrator.tracking``). ``connection``: the Ray started for this sweep already
    (``orchestrator.early_ray``), with the sweep's settings; None: start or join it here."""
    if not specs:
        return SweepOutcome(0, 0, 0, 0.0)
    start = time.perf_counter()
    if connection is None:
        connection = start_ray(address, dashboard, plugins, resources)
    check_resources(resources, connection.resources)
    announce_dashboard(connection)
    energy = dict(energy or {})
    gpus = gpus_per_budget(
        {s.budget_mb for s in specs}, resources, energy, connection.resources.get("GPU", 0)
    )
    requests = {s.budget_mb: _memory(s, gpus) for s in specs}
    check_memory(requests, node_memory())
    shared = {} if should_stop() else share_datasets(specs)
    recorder = _Recorder(store, len(specs), show_progress, should_stop, scheduler)
    import_callback_census().join()
    try:
        trackers, tracker_env = tracker_callbacks(tracking or {}, store, name)
        if not should_stop():
            warm = tune_actors_on_warm_workers(connection.warm_workers)
            with _tune_environment(tracker_env), warm:
                extras = _TuneExtras(_tune_scheduler(scheduler, specs), trackers)
                _fit(specs, store, resources, name, recorder, shared, energy, plugins, gpus, extras)
    finally:
        recorder.close()  # every record handed over is durable (or write_error says why not)
    if recorder.write_error is not None:
        raise recorder.write_error
    return SweepOutcome(
        submitted=len(specs),
        recorded=len(recorder.written),
        crashed=recorder.crashed,
        wall_time_s=time.perf_counter() - start,
        interrupted=should_stop(),
    )


def start_ray(
    address: str | None, dashboard: bool, plugins: Sequence[str], resources: Resources
) -> Connection:
    """A sweep's Ray, as ``run_sweep`` starts or joins it (``connect``: the grid's
    plug-ins shipped, its object store size), while Tune's callback census is imported
    in a thread."""
    import_callback_census()
    return connect(address, dashboard, _shipped(plugins), resources.object_store_mb)


# What Ray Tune imports to count a run's callbacks by class before its first trial (its
# usage telemetry): its tracker integrations, MLflow's alone 1.0 s here when installed.
_CALLBACK_CENSUS = (
    "ray.air.integrations.mlflow",
    "ray.air.integrations.wandb",
    "ray.air.integrations.comet",
    "ray.tune.logger.aim",
)


@functools.cache  # a process imports them once: the thread of the first call
def import_callback_census() -> threading.Thread:
    """Import ``_CALLBACK_CENSUS`` in a thread while Ray starts (a start that mostly waits
    on Ray's own processes), not on the way to the first trial; join it before Tune."""

    def census() -> None:
        for module in _CALLBACK_CENSUS:
            with contextlib.suppress(Exception):  # not installed: Tune skips it too
                importlib.import_module(module)

    thread = threading.Thread(target=census, name="tune-callback-census", daemon=True)
    thread.start()
    return thread


def _shipped(plugins: Sequence[str]) -> list[str]:
    """``workers.plugins.shipped_paths`` of the grid's plug-ins; none to look for without
    plug-ins (it scans every installed distribution: a third of a second before Ray starts)."""
    from workers.plugins import shipped_paths

    return shipped_paths(plugins) if plugins else []


def _memory(spec: TrialSpec, gpus: dict[str, float]) -> int:
    """``memory_request`` of ``spec`` under the sweep's GPU shares (by budget)."""
    return memory_request(spec.budget_mb, gpus[str(spec.budget_mb)], spec.train.device)


def _fit(
    specs: Sequence[TrialSpec],
    store: RecordStore,
    resources: Resources,
    name: str,
    recorder: _Recorder,
    shared: dict[str, Any],
    energy: dict[str, Any],
    plugins: Sequence[str],
    gpus: dict[str, float],
    extras: _TuneExtras | None = None,
) -> None:
    """One Tune run of ``specs``: a trial per spec, ``recorder`` writing the records."""
    extras = extras or _TuneExtras()
    trainable = tune.with_resources(
        # The datasets' refs travel with the function, unpickled once per worker process;
        # tune.with_parameters would fetch them from this driver again for every trial
        # (20-30 ms between two trials; benchmarks/overhead.py).
        functools.partial(_trainable, shared=shared),
        lambda config: {
            "cpu": resources.cpus_per_trial,
            "gpu": config["gpus"][str(TrialSpec.from_json(config["spec"]).budget_mb)],
            "memory": _memory(TrialSpec.from_json(config["spec"]), config["gpus"]),
        },
    )
    tuner = tune.Tuner(
        trainable,
        param_space={
            "spec": tune.grid_search([s.to_json() for s in specs]),
            "threads": resources.cpus_per_trial,
            "energy": energy,
            "plugins": list(plugins),
            "gpus": gpus,
            "artifacts": store.folder(ARTIFACTS),
            "epoch_validation": True,  # val_accuracy per epoch where there is a val split
        },
        tune_config=tune.TuneConfig(
            max_concurrent_trials=resources.max_concurrent,
            # A finished trial's worker process takes the next trial: torch, timm and
            # peft are imported once per worker, not once per trial.
            reuse_actors=True,
            scheduler=extras.scheduler,
            trial_name_creator=_trial_label,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=store.folder("_tune"),
            callbacks=[recorder, *_result_files(), *extras.callbacks],
            stop=_StopAll(recorder.stopping),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=resources.max_retries),
        ),
    )
    try:
        tuner.fit()
    finally:
        recorder.close()


def _result_files() -> list[Any]:
    """Tune's per-trial ``result.json`` and ``progress.csv`` (what ``ResultGrid`` and
    ``ExperimentAnalysis`` read). Tune's default set also writes TensorBoard event files
    and flushes them at every result: a third of the driver's time per trial in
    benchmarks/overhead.py, for files that only the ``tensorboard`` tracker asks for."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [JsonLoggerCallback(), CSVLoggerCallback()]


@dataclass(frozen=True)
class _TuneExtras:
    """What the grid's optional sections add to a Tune run."""

    scheduler: Any = None  # a ray.tune.schedulers scheduler; None: Tune's FIFO
    callbacks: tuple[Any, ...] = ()  # the trackers' logger callbacks


def _tune_scheduler(scheduler: Scheduler | None, specs: Sequence[TrialSpec]) -> Any:
    """Tune's scheduler for the grid's ``scheduler:`` section (None without one), one
    that lets every trial finish its last epoch (``_LastEpochRuns``)."""
    if scheduler is None:
        return None
    from ray.tune import schedulers

    epochs = max((s.train.epochs for s in specs if s.kind == "finetune"), default=1)
    base = getattr(schedulers, SCHEDULERS[scheduler.name].tune_class)
    # made here, by name from the registry; Tune saves it with cloudpickle (by value)
    cls = type(f"{base.__name__}LastEpochRuns", (_LastEpochRuns, base), {})
    return cls(**scheduler.options(epochs))


class _LastEpochRuns:
    """Mixed into a Tune scheduler: a trial is never stopped on its last epoch's result
    (``train.epochs``; its record is a test evaluation away, worth more than the time a
    stop saves). As the search's pruner does."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        from ray.tune.schedulers import TrialScheduler

        decision = super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]
        last = TrialSpec.from_json(trial.config["spec"]).train.epochs
        return TrialScheduler.CONTINUE if result.get("epoch", 0) >= last else decision


def tracker_callbacks(
    tracking: dict[str, Any], store: RecordStore, name: str
) -> tuple[tuple[Any, ...], dict[str, str]]:
    """Ray Tune's logger callbacks for the grid's ``tracking:`` section (tracker name ->
    its config, ``orchestrator.tracking``), and the environment they need while Tune runs."""
    callbacks, env = [], {}
    for tracker, config in tracking.items():
        callback, needs = _TRACKER_CALLBACKS[tracker](config, store, name)
        callbacks.append(callback)
        env.update(needs)
    return tuple(callbacks), env


def _tensorboard(config: Any, store: RecordStore, name: str) -> tuple[Any, dict[str, str]]:
    from ray.tune.logger import TBXLoggerCallback

    log.info("TensorBoard: tensorboard --logdir %s", store.folder("_tune"))
    return TBXLoggerCallback(), {}


def _mlflow(config: Any, store: RecordStore, name: str) -> tuple[Any, dict[str, str]]:
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    uri = mlflow_uri(config, store.output)
    log.info("MLflow: tracking URI %s, experiment %s", uri, config.experiment or name)
    callback = MLflowLoggerCallback(
        tracking_uri=uri, experiment_name=config.experiment or name, tags={"grid": name}
    )
    return callback, mlflow_environment(uri)


def _wandb(config: Any, store: RecordStore, name: str) -> tuple[Any, dict[str, str]]:
    from ray.air.integrations.wandb import WandbLoggerCallback

    mode = wandb_mode(config)
    # absolute: the logging actor works in the trial's folder (grid validation makes
    # sure that a URI output comes with a local dir)
    folder = Path(config.dir or store.output).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    log.info("Weights & Biases: project %s, %s, folder %s", config.project or name, mode, folder)
    # the record's JSON is no metric; WANDB_MODE here: Ray asks for no API key offline
    callback = WandbLoggerCallback(
        project=config.project or name, excludes=["record"], mode=mode, dir=str(folder)
    )
    return callback, {"WANDB_MODE": mode}


# tracking: section name -> (its config, the store, the grid's name) -> (callback, env)
_TRACKER_CALLBACKS: dict[str, Callable[[Any, RecordStore, str], tuple[Any, dict[str, str]]]] = {
    "tensorboard": _tensorboard,
    "mlflow": _mlflow,
    "wandb": _wandb,
}


# ---------------------------------------------------------------- tasks for the search


@ray.remote(num_cpus=0)
class _ProgressBox:
    """Figures that search tasks report while they train, until the driver takes them."""

    def __init__(self) -> None:
        self.items: list[tuple[int, dict[str, float]]] = []

    def put(self, key: int, figures: dict[str, float]) -> None:
        self.items.append((key, figures))

    def take(self) -> list[tuple[int, dict[str, float]]]:
        items, self.items = self.items, []
        return items


@ray.remote
def _search_task(config: dict[str, Any], shared: dict[str, Any], key: int, box: Any | None) -> str:
    """One spec in a Ray worker; its record as JSON. Live figures go to the Ray gauges
    and, when the driver asked for them (``box``), to the driver."""
    spec = TrialSpec.from_json(config["spec"])
    live = LiveMetrics(spec)

    def progress(figures: dict[str, float]) -> None:
        live(figures)
        if box is not None and "epoch" in figures:  # the driver's pruner reads epochs only
            box.put.remote(key, dict(figures))

    return _run_spec(spec, config, shared, progress).to_json()


class SpecRunner:
    """Runs TrialSpecs as plain Ray tasks, ``capacity`` at once, for a driver that picks
    each next trial from the results so far (the Optuna ask/tell loop of
    ``orchestrator.search``): ``submit``, then ``wait`` returns the trials that ended.

    Tune is not used here because Tune wants every trial (or a searcher that owns the
    loop) up front; a task per spec keeps the same trial body (``_run_spec``), the same
    resources per trial, datasets decoded once into the object store, worker processes
    reused between trials, and a re-run of a task whose worker died (``max_retries``).
    A task that still dies is a ``failed`` record with Ray's error. With
    ``forward_progress`` the trials' live figures come back to ``wait``'s
    ``on_progress``, whose False cancels the trial (it ends without a record).
    """

    def __init__(
        self,
        resources: Resources,
        *,
        budgets_mb: set[float],
        capacity: int,
        energy: dict[str, Any] | None = None,
        plugins: Sequence[str] = (),
        address: str | None = None,
        dashboard: bool = False,
        forward_progress: bool = False,
        artifacts: str | None = None,
    ) -> None:
        connection = connect(address, dashboard, _shipped(plugins), resources.object_store_mb)
        check_resources(resources, connection.resources)
        announce_dashboard(connection)
        self.capacity = capacity
        self.resources = resources
        self.energy = dict(energy or {})
        self.plugins = list(plugins)
        self.gpus = gpus_per_budget(
            budgets_mb, resources, self.energy, connection.resources.get("GPU", 0)
        )
        check_memory({b: memory_request(b, self.gpus[str(b)]) for b in budgets_mb}, node_memory())
        self.box = _ProgressBox.remote() if forward_progress else None
        self.artifacts = artifacts
        self.shared: dict[str, Any] = {}
        self.tried: set[str] = set()  # dataset keys already shared (or not shareable)
        self.running: dict[Any, tuple[int, TrialSpec]] = {}  # ObjectRef -> (key, spec)

    def submit(self, key: int, spec: TrialSpec) -> None:
        """Start ``spec`` as soon as the cluster has room; ``key`` names it in ``wait``."""
        from workers.data import shared_key

        dataset = shared_key(spec.dataset, spec.dataset_args)
        if dataset not in self.tried:
            self.tried.add(dataset)
            self.shared.update(share_datasets([spec]))
        config = {
            "spec": spec.to_json(),
            "threads": self.resources.cpus_per_trial,
            "energy": self.energy,
            "plugins": self.plugins,
            "gpus": self.gpus,
            "artifacts": self.artifacts,
            "epoch_validation": self.box is not None,  # a pruner reads per-epoch accuracy
        }
        task = _search_task.options(
            num_cpus=self.resources.cpus_per_trial,
            num_gpus=self.gpus[str(spec.budget_mb)],
            memory=_memory(spec, self.gpus),
            max_retries=self.resources.max_retries,
            name=f"trial {spec.trial_id} {spec.label}",
        )
        self.running[task.remote(config, self.shared, key, self.box)] = (key, spec)

    def wait(
        self, timeout_s: float, on_progress: Callable[[int, dict[str, float]], bool]
    ) -> list[tuple[int, TrialRecord | None]]:
        """Trials that ended within ``timeout_s``: (key, record), record None when the
        trial was cancelled. Live figures that arrived first go to ``on_progress``."""
        if self.box is not None:
            for key, figures in ray.get(self.box.take.remote()):
                ref = next((r for r, (k, _) in self.running.items() if k == key), None)
                if ref is not None and not on_progress(key, figures):
                    ray.cancel(ref)
        if not self.running:
            return []
        ready, _ = ray.wait(list(self.running), num_returns=1, timeout=timeout_s)
        if ready:  # and every other one already done
            ready, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
        out = []
        for ref in ready:
            key, spec = self.running.pop(ref)
            try:
                out.append((key, TrialRecord.from_json(ray.get(ref))))
            except ray.exceptions.TaskCancelledError:
                out.append((key, None))
            except ray.exceptions.RayError as exc:
                out.append((key, TrialRecord(spec=spec, status="failed", error=f"ray: {exc}")))
        return out

    def close(self) -> None:
        """Cancel the trials still running (an interrupted search)."""
        for ref in self.running:
            ray.cancel(ref)
        self.running.clear()
