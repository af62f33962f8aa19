"""Energy meters, each on its boundary: a fake ``pynvml`` module (a GPU with an energy
counter and a power sensor), a powercap tree fabricated in tmp_path, controlled clocks.
No GPU and no RAPL access needed."""

from __future__ import annotations

import logging
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pynvml as real_nvml
import pytest
import torch

from workers.energy import (
    ENERGY_METERS,
    EnergyConfig,
    EnergyMeasurement,
    EstimateMeter,
    RaplMeter,
    gpu_exclusive,
    rapl_zones,
    select_meter,
    trapezoid,
)

BUS_ID = "00000000:65:00.0"  # what torch's (faked) device properties below map to


class FakeGpu:
    """One GPU as NVML shows it; ``events`` records the order of readings and syncs."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.energy_mj: int | None = 0  # None: no counter (pre-Volta)
        self.power_mw = 150_000
        self.power_reads = 0
        self.power_fails_after: int | None = None
        self.processes = [types.SimpleNamespace(pid=4242, usedGpuMemory=1 << 20)]
        self.mig = 0


def fake_nvml(gpu: FakeGpu, library: bool = True) -> types.ModuleType:
    """A stand-in for the ``pynvml`` module around ``gpu``, with pynvml's own error types."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = real_nvml.NVMLError
    nvml.NVMLError_NotSupported = real_nvml.NVMLError_NotSupported
    nvml.NVMLError_LibraryNotFound = real_nvml.NVMLError_LibraryNotFound
    nvml.inits = 0

    def init() -> None:
        if not library:
            raise real_nvml.NVMLError(real_nvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        nvml.inits += 1

    def shutdown() -> None:
        assert nvml.inits > 0, "nvmlShutdown without nvmlInit"
        nvml.inits -= 1

    def handle(bus_id: str) -> FakeGpu:
        assert nvml.inits > 0, "NVML used before nvmlInit"
        if bus_id != BUS_ID:
            raise real_nvml.NVMLError(real_nvml.NVML_ERROR_NOT_FOUND)
        return gpu

    def energy(h: FakeGpu) -> int:
        if h.energy_mj is None:
            raise real_nvml.NVMLError(real_nvml.NVML_ERROR_NOT_SUPPORTED)
        h.events.append("read")
        return h.energy_mj

    def power(h: FakeGpu) -> int:
        h.power_reads += 1
        if h.power_fails_after is not None and h.power_reads > h.power_fails_after:
            raise real_nvml.NVMLError(real_nvml.NVML_ERROR_GPU_IS_LOST)
        h.events.append("read")
        return h.power_mw

    nvml.nvmlInit = init
    nvml.nvmlShutdown = shutdown
    nvml.nvmlDeviceGetHandleByPciBusId = handle
    nvml.nvmlDeviceGetTotalEnergyConsumption = energy
    nvml.nvmlDeviceGetPowerUsage = power
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: list(h.processes)
    nvml.nvmlDeviceGetMigMode = lambda h: [h.mig, h.mig]
    return nvml


@pytest.fixture
def events() -> list[str]:
    return []


@pytest.fixture
def gpu(events: list[str]) -> FakeGpu:
    return FakeGpu(events)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch, gpu: FakeGpu) -> types.ModuleType:
    """The fake module installed as ``pynvml``; torch's CUDA device 0 sits at BUS_ID."""
    module = fake_nvml(gpu)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x65, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    return module


@pytest.fixture
def sync(events: list[str]) -> Any:
    return lambda: events.append("sync")


def no_rapl(tmp_path: Path, **kwargs: Any) -> EnergyConfig:
    """A config whose powercap root is empty (deterministic on any machine)."""
    return EnergyConfig(powercap_root=str(tmp_path / "no-powercap"), **kwargs)


def make_powercap(root: Path, zones: dict[str, tuple[str, int, int]]) -> Path:
    """Folders ``root/<zone>`` with name, energy_uj and max_energy_range_uj files."""
    for zone, (name, energy_uj, max_uj) in zones.items():
        folder = root / zone
        folder.mkdir(parents=True)
        (folder / "name").write_text(name + "\n")
        (folder / "energy_uj").write_text(f"{energy_uj}\n")
        (folder / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return root


def set_counter(root: Path, zone: str, energy_uj: int) -> None:
    (root / zone / "energy_uj").write_text(f"{energy_uj}\n")


# ---------------------------------------------------------------- registry and config


def test_registry_names_the_four_meters() -> None:
    assert ENERGY_METERS.names() == ["estimate", "nvml_energy", "nvml_power", "rapl"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("meter", "joulemeter", "meter must be one of ['auto', 'estimate', 'nvml_energy'"),
        ("poll_hz", 5.0, "poll_hz must be a number in [10, 1000], got 5.0"),
        ("poll_hz", True, "poll_hz must be a number"),
        ("watts_per_core", 0.0, "watts_per_core must be a number > 0, got 0.0"),
        ("powercap_root", "", "powercap_root must be a folder path"),
    ],
)
def test_config_rejects_bad_values_by_name(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        EnergyConfig(**{field: value})
    assert message in str(info.value)


def test_measurement_average_power() -> None:
    m = EnergyMeasurement(joules=30.0, seconds=2.0, source="rapl", exclusive=False, estimated=False)
    assert m.avg_watts == 15.0
    assert EnergyMeasurement(0.0, 0.0, "rapl", False, False).avg_watts == 0.0


# ---------------------------------------------------------------- NVML energy counter


def test_nvml_counter_delta_in_joules_after_sync(
    nvml: types.ModuleType, gpu: FakeGpu, events: list[str], sync: Any, tmp_path: Path
) -> None:
    meter = select_meter(no_rapl(tmp_path), "cuda:0", sync=sync)
    assert (meter.source, meter.fallback) == ("nvml_energy", "")
    events.clear()
    gpu.energy_mj = 1_000
    meter.begin_window()
    gpu.energy_mj = 4_500
    m = meter.end_window()
    assert m.joules == pytest.approx(3.5)
    assert (m.source, m.estimated) == ("nvml_energy", False)
    assert events == ["sync", "read", "sync", "read"]  # the device is idle before each reading
    assert nvml.inits == 0  # NVML is shut down again after the window


def test_live_reading_of_an_open_window(
    nvml: types.ModuleType, gpu: FakeGpu, sync: Any, tmp_path: Path
) -> None:
    meter = select_meter(no_rapl(tmp_path), "cuda:0", sync=sync)
    assert meter.so_far() == 0.0  # no window
    gpu.energy_mj = 2**64 - 500
    meter.begin_window()
    gpu.energy_mj = 300
    assert meter.so_far() == pytest.approx(0.8)  # across the wrap, window still open
    gpu.energy_mj = 700
    assert meter.end_window().joules == pytest.approx(1.2)
    cpu = iter([10.0, 12.0, 13.0])
    estimate = EstimateMeter(5.0, sync=lambda: None, cpu_clock=lambda: next(cpu))
    estimate.begin_window()
    assert estimate.so_far() == pytest.approx(10.0)
    assert estimate.end_window().joules == pytest.approx(15.0)


def test_nvml_counter_wraps_around_unsigned_64_bit(
    nvml: types.ModuleType, gpu: FakeGpu, sync: Any, tmp_path: Path
) -> None:
    meter = select_meter(no_rapl(tmp_path), "cuda:0", sync=sync)
    gpu.energy_mj = 2**64 - 500
    meter.begin_window()
    gpu.energy_mj = 700
    assert meter.end_window().joules == pytest.approx(1.2)


@pytest.mark.parametrize(
    ("told", "pids", "mig", "expected"),
    [
        (True, [1], 0, True),  # a whole GPU, only this process
        (None, [1], 0, True),  # nobody said; NVML sees only this process
        (None, [], 0, None),  # NVML lists nothing (e.g. another PID namespace): unknown
        (False, [1], 0, False),  # the scheduler packed trials on this GPU
        (True, [1, 2], 0, False),  # told exclusive, but another process computes there
        (None, [1], 1, False),  # MIG: the counter covers every instance
    ],
)
def test_nvml_exclusive_from_scheduler_and_process_list(
    nvml: types.ModuleType,
    gpu: FakeGpu,
    sync: Any,
    tmp_path: Path,
    told: bool | None,
    pids: list[int],
    mig: int,
    expected: bool | None,
) -> None:
    gpu.processes = [types.SimpleNamespace(pid=p, usedGpuMemory=None) for p in pids]
    gpu.mig = mig
    meter = select_meter(no_rapl(tmp_path), "cuda:0", exclusive=told, sync=sync)
    meter.begin_window()
    assert meter.end_window().exclusive is expected


def test_gpu_exclusive_sees_a_process_at_either_end() -> None:
    assert gpu_exclusive(None, [1, 2], mig=False) is False
    assert gpu_exclusive(None, [1, None], mig=False) is None
    assert gpu_exclusive(True, [None, None], mig=False) is True


# ---------------------------------------------------------------- NVML power polling


def test_no_counter_falls_back_to_power_polling(
    nvml: types.ModuleType, gpu: FakeGpu, sync: Any, tmp_path: Path
) -> None:
    gpu.energy_mj = None  # pre-Volta: NVMLError_NotSupported
    meter = select_meter(no_rapl(tmp_path, poll_hz=50.0), "cuda:0", sync=sync)
    assert meter.source == "nvml_power"
    assert "does not report its total-energy counter" in meter.fallback
    meter.begin_window()
    time.sleep(0.3)
    m = meter.end_window()
    # constant 150 W: the trapezoid integral is exact from the first to the last sample
    assert m.joules == pytest.approx(150.0 * m.seconds, rel=0.02)
    assert m.avg_watts == pytest.approx(150.0, rel=0.02)
    assert meter.samples >= 0.3 * 50 * 0.5  # the poller ran near its rate (loaded CI: half)
    assert not any(t.name == "nvml-power-poller" for t in threading.enumerate())
    assert nvml.inits == 0


def test_polled_energy_spans_the_window_when_its_thread_is_slow(
    nvml: types.ModuleType,
    gpu: FakeGpu,
    sync: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a loaded machine the poller's thread takes long to start and to join: the
    energy still covers the window's own time, not those waits too (50 ms each here)."""
    from workers import energy

    real_init, real_stop = energy._Poller.__init__, energy._Poller.stop

    def slow_init(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        time.sleep(0.05)

    def slow_stop(self: Any) -> None:
        time.sleep(0.05)
        real_stop(self)

    monkeypatch.setattr(energy._Poller, "__init__", slow_init)
    monkeypatch.setattr(energy._Poller, "stop", slow_stop)
    gpu.energy_mj = None
    meter = select_meter(no_rapl(tmp_path, poll_hz=50.0), "cuda:0", sync=sync)
    meter.begin_window()
    time.sleep(0.2)
    m = meter.end_window()
    assert m.seconds < 0.24
    assert m.joules == pytest.approx(150.0 * m.seconds, rel=0.02)


def test_power_polling_failure_is_raised_and_cleaned_up(
    nvml: types.ModuleType, gpu: FakeGpu, sync: Any, tmp_path: Path
) -> None:
    from workers.energy import MeterError

    gpu.energy_mj = None
    meter = select_meter(no_rapl(tmp_path, meter="nvml_power"), "cuda:0", sync=sync)
    gpu.power_reads, gpu.power_fails_after = 0, 2
    meter.begin_window()
    time.sleep(0.3)
    with pytest.raises(MeterError, match="nvml-power-poller failed"):
        meter.end_window()
    assert not any(t.name == "nvml-power-poller" for t in threading.enumerate())
    assert nvml.inits == 0


def test_trapezoid_integrates_a_ramp() -> None:
    # 0 -> 20 W over 2 s, samples out of order: 20 J
    assert trapezoid([(2.0, 20.0), (0.0, 0.0), (1.0, 10.0)]) == pytest.approx(20.0)
    assert trapezoid([(0.0, 5.0)]) == 0.0


# ---------------------------------------------------------------- no NVML


def test_missing_nvml_library_falls_back_to_rapl(
    monkeypatch: pytest.MonkeyPatch, gpu: FakeGpu, nvml: types.ModuleType, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(gpu, library=False))
    root = make_powercap(tmp_path, {"intel-rapl:0": ("package-0", 0, 10**9)})
    config = EnergyConfig(meter="nvml_energy", powercap_root=str(root))
    meter = select_meter(config, "cuda:0", sync=lambda: None)
    assert meter.source == "rapl"
    assert "nvml_energy: NVML: NVML Shared Library Not Found" in meter.fallback
    meter.begin_window()
    set_counter(root, "intel-rapl:0", 2_000_000)
    m = meter.end_window()
    assert (m.source, m.estimated, m.joules) == ("rapl", False, pytest.approx(2.0))
    assert m.fallback == meter.fallback  # every measurement says why it is not NVML


@pytest.mark.parametrize("missing", ["library", "package"])
def test_without_nvml_or_rapl_the_estimate_is_labelled(
    monkeypatch: pytest.MonkeyPatch,
    gpu: FakeGpu,
    nvml: types.ModuleType,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    missing: str,
) -> None:
    if missing == "library":
        monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(gpu, library=False))
    else:
        monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    with caplog.at_level(logging.WARNING, logger="workers.energy"):
        meter = select_meter(no_rapl(tmp_path, meter="nvml_energy"), "cuda:0", sync=lambda: None)
    assert meter.source == "estimated"
    reason = "Library Not Found" if missing == "library" else "nvidia-ml-py (pynvml) is not"
    assert reason in meter.fallback
    assert "rapl: no RAPL package domain" in meter.fallback
    assert "energy meter 'nvml_energy' is unavailable" in caplog.text
    meter.begin_window()
    m = meter.end_window()
    assert (m.source, m.estimated, m.exclusive) == ("estimated", True, None)


def test_cpu_trial_skips_the_gpu_meters(tmp_path: Path) -> None:
    meter = select_meter(no_rapl(tmp_path), torch.device("cpu"))
    assert meter.source == "estimated"
    assert "nvml_energy: the trial runs on cpu" in meter.fallback


# ---------------------------------------------------------------- RAPL


PACKAGES = {
    "intel-rapl:0": ("package-0", 900, 1_000),  # about to wrap
    "intel-rapl:0:0": ("core", 50, 1_000),  # a sub-zone: inside package-0's figure
    "intel-rapl:1": ("package-1", 5_000_000, 2**40),
    "intel-rapl:2": ("psys", 7, 2**40),  # the whole platform: not a package
}


def test_rapl_sums_packages_across_a_wrap_around(tmp_path: Path) -> None:
    root = make_powercap(tmp_path, PACKAGES)
    assert [z.name for z in rapl_zones(root)] == ["package-0", "package-1"]
    meter = select_meter(EnergyConfig(meter="rapl", powercap_root=str(root)), "cpu")
    meter.begin_window()
    set_counter(root, "intel-rapl:0", 100)  # wrapped: 100 uJ to the top, 100 after
    set_counter(root, "intel-rapl:0:0", 999)
    set_counter(root, "intel-rapl:1", 6_000_000)
    set_counter(root, "intel-rapl:2", 10**9)
    m = meter.end_window()
    assert m.joules == pytest.approx((200 + 1_000_000) / 1e6)
    assert (m.source, m.estimated, m.fallback) == ("rapl", False, "")


def test_rapl_counts_every_wrap_it_samples(tmp_path: Path) -> None:
    root = make_powercap(tmp_path, {"intel-rapl:0": ("package-0", 900, 1_000)})
    meter = RaplMeter(rapl_zones(root), None, sync=lambda: None)
    meter.begin_window()
    for value in (100, 800, 50):  # two wraps: 200 + 700 + 250 uJ
        set_counter(root, "intel-rapl:0", value)
        meter.sample()
    assert meter.end_window().joules == pytest.approx(1150 / 1e6)


@pytest.mark.parametrize(("told", "expected"), [(None, False), (False, False), (True, True)])
def test_rapl_is_a_share_unless_told_exclusive(
    tmp_path: Path, told: bool | None, expected: bool
) -> None:
    root = make_powercap(tmp_path, {"intel-rapl:0": ("package-0", 0, 10**9)})
    meter = select_meter(EnergyConfig(meter="rapl", powercap_root=str(root)), "cpu", exclusive=told)
    meter.begin_window()
    assert meter.end_window().exclusive is expected


def test_unreadable_rapl_falls_back_with_its_reason(tmp_path: Path) -> None:
    root = make_powercap(tmp_path, {"intel-rapl:0": ("package-0", 0, 10**9)})
    energy = root / "intel-rapl:0" / "energy_uj"
    energy.unlink()
    energy.mkdir()  # reading it fails (root may read any file, so no chmod here)
    meter = select_meter(EnergyConfig(meter="rapl", powercap_root=str(root)), "cpu")
    assert meter.source == "estimated"
    assert meter.fallback.startswith(f"rapl: {root / 'intel-rapl:0'} is not a readable RAPL zone")


def test_rapl_permission_error_names_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_powercap(tmp_path, {"intel-rapl:0": ("package-0", 0, 10**9)})
    plain_read = Path.read_text

    def read_text(path: Path, *args: Any, **kwargs: Any) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return plain_read(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    meter = select_meter(EnergyConfig(meter="rapl", powercap_root=str(root)), "cpu")
    assert meter.source == "estimated"
    assert "is not readable: RAPL is root-only" in meter.fallback


# ---------------------------------------------------------------- estimate


@pytest.mark.parametrize("cpu_seconds", [0.5, 2.0, 8.0])
def test_estimate_is_cpu_time_times_watts_per_core(cpu_seconds: float) -> None:
    cpu = iter([10.0, 10.0 + cpu_seconds])
    wall = iter([100.0, 104.0])
    meter = EstimateMeter(
        12.0, sync=lambda: None, clock=lambda: next(wall), cpu_clock=lambda: next(cpu)
    )
    meter.begin_window()
    m = meter.end_window()
    assert m.joules == pytest.approx(12.0 * cpu_seconds)
    assert (m.seconds, m.avg_watts) == (pytest.approx(4.0), pytest.approx(3.0 * cpu_seconds))
    assert (m.source, m.estimated, m.exclusive) == ("estimated", True, None)


def test_estimate_uses_this_process_cpu_time(tmp_path: Path) -> None:
    meter = select_meter(no_rapl(tmp_path, meter="estimate", watts_per_core=10.0), "cpu")
    meter.begin_window()
    start = time.process_time()
    while time.process_time() - start < 0.05:  # busy, on this process's clock
        pass
    spent = time.process_time() - start
    m = meter.end_window()
    assert m.joules == pytest.approx(10.0 * spent, rel=0.2)


def test_windows_do_not_nest(tmp_path: Path) -> None:
    meter = select_meter(no_rapl(tmp_path), "cpu")
    with pytest.raises(RuntimeError, match="no window is open"):
        meter.end_window()
    meter.begin_window()
    assert meter.window_open
    with pytest.raises(RuntimeError, match="already open"):
        meter.begin_window()
    meter.end_window()
    assert not meter.window_open
