"""Energy meters: the energy of a window of a trial, and which meter measured it.

Four meters, registered by name; ``auto`` takes the first available in this order
(the most direct measurement first):

- ``nvml_energy``: the GPU's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
  mJ since the driver loaded; Volta and newer), read at both ends of the window.
- ``nvml_power``: the GPU's power draw (``nvmlDeviceGetPowerUsage``, mW) polled by a
  background thread (20 Hz by default, at least 10 Hz) and integrated over time with
  the trapezoid rule: for GPUs without the counter.
- ``rapl``: the CPU packages' RAPL counters (``<powercap_root>/intel-rapl:N/energy_uj``,
  µJ), package domains only, summed over the packages.
- ``estimate``: CPU time of this process x a configured power per busy core. Not a
  measurement: its source is ``estimated`` and ``estimated`` is True.

A meter that is named but unavailable (no NVML library, no counter on this GPU, RAPL
not readable) falls back to the meters after it in that order; the reason is logged
and kept in ``EnergyMeasurement.fallback``.

Windows. ``begin_window()`` and ``end_window()`` call ``sync`` (``torch.cuda.synchronize``
on CUDA) before reading, so the window holds exactly the device work queued inside it;
the caller opens the window after its warm-up (the trial: after the first step).

Exclusivity. A device reading covers everything that ran on the device, so each
measurement says whether it belongs to this trial alone: ``exclusive`` is True (the
trial held the device alone), False (the device was shared: the figure is a *share*,
never the trial's own energy) or None (unknown, or not a device reading: the
estimate is per process by construction). See ``gpu_exclusive`` and ``RaplMeter``.

The API follows Zeus (``zeus/monitor/energy.py``); NVML is reached only through the
``pynvml`` module (imported when a meter is built), so tests replace that module.
The module imports no torch at import time: the grid validator reads ``EnergyConfig``.

Example:
    >>> meter = select_meter(EnergyConfig(), "cpu")
    >>> meter.begin_window()
    >>> ...  # the measured work
    >>> m = meter.end_window()
    >>> m.joules, m.avg_watts, m.source, m.exclusive, m.estimated  # doctest: +SKIP
    (41.3, 10.2, 'estimated', None, True)
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from workers.registry import NoArgs, Registry

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ENERGY_METERS = Registry("energy meter")

# ``auto`` tries these in order; a named meter falls back to the ones after it.
AUTO_ORDER = ("nvml_energy", "nvml_power", "rapl", "estimate")

# NVML's total-energy counter is an unsigned 64-bit count of mJ: a delta is taken
# modulo 2**64, which is exact across one wrap-around (more than one would need
# 1.8e16 J inside a window). A driver reload resets it, but also ends the process.
NVML_COUNTER_MODULUS = 2**64

MIN_POLL_HZ = 10.0  # slower than this misses the power swings of a training step
MAX_POLL_HZ = 1000.0  # NVML refreshes power every few ms at best: faster only burns CPU

# A RAPL counter wraps after max_energy_range_uj (about 65-262 kJ on current CPUs);
# read every second, a wrap goes unseen only above 65 kW per package.
RAPL_POLL_S = 1.0


class MeterUnavailable(RuntimeError):
    """A meter that cannot measure on this machine; the message says why."""


class MeterError(RuntimeError):
    """A meter that failed inside a window (e.g. NVML stopped answering)."""


# ---------------------------------------------------------------- config and result


@dataclass(frozen=True)
class EnergyConfig:
    """How a trial measures energy: the grid's top-level ``energy:`` section."""

    meter: str = "auto"  # auto | nvml_energy | nvml_power | rapl | estimate
    poll_hz: float = 20.0  # nvml_power: samples per second (>= 10)
    # estimate: W drawn by one fully busy core. 12 W is Green Algorithms' per-core
    # TDP for an unknown CPU (TDP / cores of common CPUs: 4-24 W); set your CPU's
    # TDP / cores for a closer estimate.
    watts_per_core: float = 12.0
    powercap_root: str = "/sys/class/powercap"  # where RAPL zones live (containers may move it)
    # schedule every trial on a whole GPU, so that the energy of its device is its own
    # (otherwise trials packed on a GPU record their energy as a share)
    exclusive: bool = False

    def __post_init__(self) -> None:
        problems = []
        valid = ["auto", *ENERGY_METERS.names()]
        if self.meter not in valid:
            problems.append(f"meter must be one of {valid}, got {self.meter!r}")
        if not _is_number(self.poll_hz) or not MIN_POLL_HZ <= self.poll_hz <= MAX_POLL_HZ:
            problems.append(
                f"poll_hz must be a number in [{MIN_POLL_HZ:g}, {MAX_POLL_HZ:g}], "
                f"got {self.poll_hz!r}"
            )
        if not _is_number(self.watts_per_core) or self.watts_per_core <= 0:
            problems.append(f"watts_per_core must be a number > 0, got {self.watts_per_core!r}")
        if not isinstance(self.exclusive, bool):
            problems.append(f"exclusive must be true or false, got {self.exclusive!r}")
        if not isinstance(self.powercap_root, str) or not self.powercap_root:
            problems.append(f"powercap_root must be a folder path, got {self.powercap_root!r}")
        if problems:
            raise ValueError("; ".join(problems))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class EnergyMeasurement:
    """The energy of one window."""

    joules: float  # J consumed in the window (by the whole device: see exclusive)
    seconds: float  # s, wall time of the window
    source: str  # nvml_energy | nvml_power | rapl | estimated
    exclusive: bool | None  # True: device held alone; False: a share; None: unknown / n.a.
    estimated: bool  # True: not a measurement (CPU time x watts_per_core)
    fallback: str = ""  # why the meters tried before this one were not used
    avg_watts: float = field(init=False)  # W, joules / seconds (0 for an empty window)

    def __post_init__(self) -> None:
        watts = self.joules / self.seconds if self.seconds > 0 else 0.0
        object.__setattr__(self, "avg_watts", watts)


# ---------------------------------------------------------------- meters


class EnergyMeter(ABC):
    """One window at a time: ``begin_window()``, the work, ``end_window()``.

    ``sync`` runs before every reading (it waits for queued device work); ``clock``
    gives the wall time of the window, s.
    """

    source: str = ""
    estimated: bool = False

    def __init__(
        self, sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self._sync = sync
        self._clock = clock
        self._t0: float | None = None
        self.fallback = ""  # set by select_meter

    @property
    def window_open(self) -> bool:
        """True between ``begin_window()`` and ``end_window()``: a failure path that may
        have left a window open ends it (pollers run until then)."""
        return self._t0 is not None

    def begin_window(self) -> None:
        """Start measuring (after the device finished what was queued before)."""
        if self._t0 is not None:
            raise RuntimeError(f"{self.source}: a window is already open")
        self._sync()
        self._begin()
        self._t0 = self._clock()

    def end_window(self) -> EnergyMeasurement:
        """Stop measuring (after the device finished the window's work)."""
        if self._t0 is None:
            raise RuntimeError(f"{self.source}: no window is open; call begin_window() first")
        t0, self._t0 = self._t0, None
        try:
            self._sync()
            seconds = self._clock() - t0
        finally:  # even when the sync fails: stop pollers, release NVML
            joules, exclusive = self._end()
        return EnergyMeasurement(
            joules=joules,
            seconds=seconds,
            source=self.source,
            exclusive=exclusive,
            estimated=self.estimated,
            fallback=self.fallback,
        )

    def so_far(self) -> float:
        """J since ``begin_window()`` without ending the window (a live figure for
        progress displays: no device sync, and polled meters lag by their period);
        0 when no window is open."""
        return self._so_far() if self.window_open else 0.0

    @abstractmethod
    def _so_far(self) -> float:
        """Energy of the open window up to now, J."""

    @abstractmethod
    def _begin(self) -> None:
        """Take the opening reading."""

    @abstractmethod
    def _end(self) -> tuple[float, bool | None]:
        """Take the closing reading; joules of the window and whether it was exclusive."""


class _Poller:
    """Calls ``fn`` every ``interval`` seconds on a daemon thread until ``stop()``.

    Ticks are scheduled from the start time (no drift below the asked rate); an
    exception in ``fn`` ends the thread and is raised by ``stop()``.
    """

    def __init__(self, fn: Callable[[], None], interval: float, name: str) -> None:
        self._fn = fn
        self._interval = interval
        self._stopped = threading.Event()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        tick = 1
        while not self._stopped.wait(max(0.0, start + tick * self._interval - time.monotonic())):
            try:
                self._fn()
            except Exception as exc:  # reported by stop(), in the caller's thread
                self._error = exc
                return
            tick += 1

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        if self._error is not None:
            raise MeterError(f"{self._thread.name} failed: {self._error}") from self._error


# ---------------------------------------------------------------- NVML


def gpu_exclusive(
    told: bool | None, process_counts: Sequence[int | None], mig: bool
) -> bool | None:
    """Whether a GPU reading belongs to the trial alone.

    ``told``: what the scheduler knows (it packed trials on this GPU: False; it gave
    the trial a whole GPU: True; None: not said). ``process_counts``: compute processes
    NVML listed on the device at each end of the window (None: not listable). A
    count above 1 or an enabled MIG mode (the counter covers every instance) makes it
    a share whatever the scheduler said; exactly one process (this trial's) and no
    word from the scheduler is exclusive; anything else is unknown. NVML samples only
    the window's ends: a process that comes and goes inside it is the scheduler's
    to report.
    """
    crowded = [n for n in process_counts if n is not None and n > 1]
    if told is False or mig or crowded:
        if told is True:
            seen = f"{max(crowded)} compute processes" if crowded else "MIG mode"
            log.warning("the GPU was to be exclusive, but NVML saw %s: energy is a share", seen)
        return False
    if told is True:
        return True
    if process_counts and all(n == 1 for n in process_counts):
        return True
    return None


class _NvmlGpu:
    """One GPU through NVML, initialised only while a window is open (NVML counts inits)."""

    def __init__(self, nvml: ModuleType, bus_id: str) -> None:
        self.nvml = nvml
        self.bus_id = bus_id
        self.handle: Any = None

    def open(self) -> None:
        self.nvml.nvmlInit()
        try:
            self.handle = self.nvml.nvmlDeviceGetHandleByPciBusId(self.bus_id)
        except self.nvml.NVMLError:
            self.nvml.nvmlShutdown()
            raise

    def close(self) -> None:
        self.handle = None
        self.nvml.nvmlShutdown()

    def energy_mj(self) -> int:
        return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def power_w(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0

    def compute_processes(self) -> int | None:
        try:
            return len(self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle))
        except self.nvml.NVMLError as exc:
            log.info("NVML cannot list the processes on %s: %s", self.bus_id, exc)
            return None

    def mig_enabled(self) -> bool:
        try:
            current, _pending = self.nvml.nvmlDeviceGetMigMode(self.handle)
        except self.nvml.NVMLError:  # not a MIG-capable GPU
            return False
        return bool(current)


class NvmlEnergyMeter(EnergyMeter):
    """Delta of the GPU's total-energy counter (mJ, unsigned 64-bit) over the window."""

    source = "nvml_energy"

    def __init__(
        self,
        gpu: _NvmlGpu,
        told_exclusive: bool | None,
        sync: Callable[[], None],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__(sync, clock)
        self._gpu = gpu
        self._told = told_exclusive
        self._start_mj = 0
        self._counts: list[int | None] = []

    def _begin(self) -> None:
        self._gpu.open()
        try:
            self._start_mj = self._gpu.energy_mj()
            self._counts = [self._gpu.compute_processes()]
        except BaseException:
            self._gpu.close()
            raise

    def _so_far(self) -> float:
        return (self._gpu.energy_mj() - self._start_mj) % NVML_COUNTER_MODULUS / 1000.0

    def _end(self) -> tuple[float, bool | None]:
        try:
            delta_mj = (self._gpu.energy_mj() - self._start_mj) % NVML_COUNTER_MODULUS
            self._counts.append(self._gpu.compute_processes())
            mig = self._gpu.mig_enabled()
        finally:
            self._gpu.close()
        return delta_mj / 1000.0, gpu_exclusive(self._told, self._counts, mig)


def trapezoid(samples: Sequence[tuple[float, float]]) -> float:
    """Integral of (time s, power W) samples over time, J (trapezoid rule)."""
    return sum((t1 - t0) * (w0 + w1) / 2.0 for (t0, w0), (t1, w1) in pairwise(sorted(samples)))


class NvmlPowerMeter(EnergyMeter):
    """GPU power polled at ``poll_hz`` on a background thread, integrated over the window.

    NVML's power reading is averaged by the driver over a short period (up to 1 s on
    some GPUs), so short windows blur; the counter meter has no such limit.
    """

    source = "nvml_power"

    def __init__(
        self,
        gpu: _NvmlGpu,
        told_exclusive: bool | None,
        sync: Callable[[], None],
        poll_hz: float,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__(sync, clock)
        self._gpu = gpu
        self._told = told_exclusive
        self._interval = 1.0 / poll_hz
        self._samples: list[tuple[float, float]] = []
        self._counts: list[int | None] = []
        self._poller: _Poller | None = None
        self._opened = 0.0  # clock of the opening reading

    def _sample(self) -> None:
        self._samples.append((self._clock(), self._gpu.power_w()))

    def _begin(self) -> None:
        # the samples span the window's clock: the opening reading is the last thing
        # before it starts, the closing one is stamped when it stops (a loaded machine
        # takes milliseconds to start or join the poller's thread)
        self._gpu.open()
        try:
            self._counts = [self._gpu.compute_processes()]
            self._samples = []
            self._poller = _Poller(self._sample, self._interval, name="nvml-power-poller")
            opening = (self._clock(), self._gpu.power_w())
            self._samples.append(opening)
            self._opened = opening[0]
        except BaseException:
            with contextlib.suppress(MeterError):
                if self._poller is not None:
                    self._poller.stop()
            self._poller = None
            self._gpu.close()
            raise

    def _so_far(self) -> float:
        return trapezoid(list(self._samples))  # a copy: the poller appends meanwhile

    def _end(self) -> tuple[float, bool | None]:
        assert self._poller is not None
        closed = self._clock()
        try:
            self._poller.stop()
            window = [(t, w) for t, w in self._samples if self._opened <= t <= closed]
            self._samples = [*window, (closed, self._gpu.power_w())]
            self._counts.append(self._gpu.compute_processes())
            mig = self._gpu.mig_enabled()
        finally:
            self._poller = None
            self._gpu.close()
        return trapezoid(self._samples), gpu_exclusive(self._told, self._counts, mig)

    @property
    def samples(self) -> int:
        """Power readings taken in the last (or current) window."""
        return len(self._samples)


def _nvml_gpu(ctx: MeterContext, probe: Callable[[_NvmlGpu], object], what: str) -> _NvmlGpu:
    """The trial's GPU through NVML, if ``probe`` can read it; else MeterUnavailable."""
    if ctx.device.type != "cuda":
        raise MeterUnavailable(f"the trial runs on {ctx.device.type}, not on a GPU")
    try:
        import pynvml
    except ImportError:
        raise MeterUnavailable("nvidia-ml-py (pynvml) is not installed") from None
    from workers.memory import pci_bus_id  # imports torch: not at this module's import

    gpu = _NvmlGpu(pynvml, pci_bus_id(ctx.device))
    try:
        gpu.open()
    except pynvml.NVMLError as exc:
        raise MeterUnavailable(f"NVML: {exc}") from None
    try:
        probe(gpu)
    except pynvml.NVMLError_NotSupported:
        raise MeterUnavailable(f"this GPU does not report its {what}") from None
    except pynvml.NVMLError as exc:
        raise MeterUnavailable(f"NVML {what}: {exc}") from None
    finally:
        gpu.close()
    return gpu


# ---------------------------------------------------------------- RAPL


@dataclass
class _RaplZone:
    """One package domain's counter, accumulated across wrap-arounds."""

    name: str
    energy_path: Path
    max_uj: int  # the counter wraps to 0 after this value
    last_uj: int = 0
    total_uj: int = 0

    def read(self) -> int:
        return int(self.energy_path.read_text().strip())

    def start(self) -> None:
        self.last_uj, self.total_uj = self.read(), 0

    def advance(self) -> None:
        now = self.read()
        step = now - self.last_uj if now >= self.last_uj else self.max_uj - self.last_uj + now
        self.total_uj += step
        self.last_uj = now


def rapl_zones(root: Path) -> list[_RaplZone]:
    """The package domains under ``root`` (``intel-rapl:N`` named ``package-*``).

    Sub-zones (``intel-rapl:N:M``: core, uncore, dram) lie inside their package's
    figure and are excluded, as is ``psys`` (the whole platform). Raises
    MeterUnavailable naming the file that is missing or unreadable.
    """
    zones = []
    for folder in sorted(root.glob("intel-rapl:*")):
        if folder.name.count(":") != 1:
            continue
        try:
            name = (folder / "name").read_text().strip()
            if not name.startswith("package"):
                continue
            zone = _RaplZone(
                name=name,
                energy_path=folder / "energy_uj",
                max_uj=int((folder / "max_energy_range_uj").read_text().strip()),
            )
            zone.read()
        except PermissionError:
            raise MeterUnavailable(
                f"{folder}/energy_uj is not readable: RAPL is root-only on kernels patched "
                "for CVE-2020-8694"
            ) from None
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"{folder} is not a readable RAPL zone ({exc})") from None
        zones.append(zone)
    if not zones:
        raise MeterUnavailable(f"no RAPL package domain under {root}")
    return zones


class RaplMeter(EnergyMeter):
    """CPU package energy from RAPL counters (µJ), summed over the packages.

    A package serves every process on the machine, so the reading is a share
    unless the caller says the trial had the machine to itself (``exclusive=True``).
    A thread reads the counters every ``poll_s`` seconds so that no wrap-around goes
    unseen in a long window.
    """

    source = "rapl"

    def __init__(
        self,
        zones: list[_RaplZone],
        told_exclusive: bool | None,
        sync: Callable[[], None],
        poll_s: float = RAPL_POLL_S,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__(sync, clock)
        self._zones = zones
        self._exclusive = told_exclusive is True
        self._poll_s = poll_s
        self._poller: _Poller | None = None
        self._lock = threading.Lock()

    def sample(self) -> None:
        """Read the counters now and add what they advanced (the poller calls this)."""
        with self._lock:
            for zone in self._zones:
                zone.advance()

    def _begin(self) -> None:
        with self._lock:
            for zone in self._zones:
                zone.start()
        self._poller = _Poller(self.sample, self._poll_s, name="rapl-poller")

    def _so_far(self) -> float:
        with self._lock:  # as of the poller's last reading
            return sum(z.total_uj for z in self._zones) / 1e6

    def _end(self) -> tuple[float, bool | None]:
        assert self._poller is not None
        try:
            self._poller.stop()
        finally:
            self._poller = None
        self.sample()
        return sum(z.total_uj for z in self._zones) / 1e6, self._exclusive


# ---------------------------------------------------------------- estimate


class EstimateMeter(EnergyMeter):
    """CPU time of this process x ``watts_per_core``: an estimate, labelled ``estimated``.

    CPU time is ``time.process_time()``: user + system time of every thread of this
    process (torch's intra-op threads included), children excluded: a trial spawns
    no workers in its loop, and the OS reports a child's time only after it exits.
    It counts no GPU energy. ``exclusive`` is None: the figure is per process by
    construction, not a reading of a shared device.
    """

    source = "estimated"
    estimated = True

    def __init__(
        self,
        watts_per_core: float,
        sync: Callable[[], None],
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        super().__init__(sync, clock)
        self._watts_per_core = watts_per_core
        self._cpu_clock = cpu_clock
        self._cpu0 = 0.0

    def _begin(self) -> None:
        self._cpu0 = self._cpu_clock()

    def _so_far(self) -> float:
        return (self._cpu_clock() - self._cpu0) * self._watts_per_core

    def _end(self) -> tuple[float, bool | None]:
        return self._so_far(), None


# ---------------------------------------------------------------- registry and selection


@dataclass(frozen=True)
class MeterContext:
    """What a meter builder needs to know about the trial."""

    device: torch.device
    config: EnergyConfig
    exclusive: bool | None  # the scheduler's word: the trial holds its device alone
    sync: Callable[[], None]


@ENERGY_METERS.register(config_cls=NoArgs)
def nvml_energy(args: NoArgs, ctx: MeterContext) -> EnergyMeter:
    """GPU total-energy counter deltas through NVML (Volta and newer)."""
    gpu = _nvml_gpu(ctx, _NvmlGpu.energy_mj, "total-energy counter (pre-Volta GPU)")
    return NvmlEnergyMeter(gpu, ctx.exclusive, ctx.sync)


@ENERGY_METERS.register(config_cls=NoArgs)
def nvml_power(args: NoArgs, ctx: MeterContext) -> EnergyMeter:
    """GPU power polled through NVML and integrated over time."""
    gpu = _nvml_gpu(ctx, _NvmlGpu.power_w, "power draw")
    return NvmlPowerMeter(gpu, ctx.exclusive, ctx.sync, ctx.config.poll_hz)


@ENERGY_METERS.register(config_cls=NoArgs)
def rapl(args: NoArgs, ctx: MeterContext) -> EnergyMeter:
    """CPU package energy from the Linux powercap RAPL counters."""
    return RaplMeter(rapl_zones(Path(ctx.config.powercap_root)), ctx.exclusive, ctx.sync)


@ENERGY_METERS.register(config_cls=NoArgs)
def estimate(args: NoArgs, ctx: MeterContext) -> EnergyMeter:
    """CPU time x watts per core: an estimate, labelled as such."""
    return EstimateMeter(ctx.config.watts_per_core, ctx.sync)


def _fallback_order(meter: str) -> tuple[str, ...]:
    """``meter`` and the meters tried after it: a built-in one falls back to those after
    it in ``AUTO_ORDER``; a plug-in's meter to the whole ``AUTO_ORDER``."""
    if meter == "auto":
        return AUTO_ORDER
    if meter in AUTO_ORDER:
        return AUTO_ORDER[AUTO_ORDER.index(meter) :]
    return (meter, *AUTO_ORDER)


def select_meter(
    config: EnergyConfig,
    device: torch.device | str,
    *,
    exclusive: bool | None = None,
    sync: Callable[[], None] | None = None,
) -> EnergyMeter:
    """The meter ``config.meter`` asks for, or the first available after it.

    ``auto`` tries ``AUTO_ORDER`` from the start. ``exclusive`` is the scheduler's
    word on whether the trial holds its device alone (None: not known). ``sync``
    defaults to ``torch.cuda.synchronize(device)`` on CUDA and to nothing on CPU.
    The meter's ``fallback`` (copied into every measurement) lists the meters
    skipped and why.

    Example:
        >>> meter = select_meter(EnergyConfig(meter="nvml_energy"), "cuda:0", exclusive=True)
        >>> meter.source  # doctest: +SKIP
        'nvml_energy'
    """
    import torch

    device = torch.device(device)
    if sync is None:
        sync = _cuda_sync(device) if device.type == "cuda" else _no_sync
    ctx = MeterContext(device=device, config=config, exclusive=exclusive, sync=sync)
    wanted = _fallback_order(config.meter)
    skipped = []
    for name in wanted:
        try:
            meter = ENERGY_METERS.build(name, None, ctx)
        except MeterUnavailable as exc:
            skipped.append(f"{name}: {exc}")
            continue
        meter.fallback = "; ".join(skipped)
        if skipped and config.meter != "auto":
            log.warning(
                "energy meter %r is unavailable (%s); measuring with %r",
                config.meter,
                skipped[0],
                name,
            )
        elif skipped:
            log.info("energy meter: %s (skipped %s)", name, meter.fallback)
        return meter
    raise MeterUnavailable("; ".join(skipped))  # unreachable while `estimate` comes last


def _cuda_sync(device: torch.device) -> Callable[[], None]:
    import torch

    return lambda: torch.cuda.synchronize(device)


def _no_sync() -> None:
    """CPU work is done when the call returns: nothing to wait for."""
