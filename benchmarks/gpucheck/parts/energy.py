"""Energy: two of the trial's meters over the same training window, idle power subtracted.

On CUDA: ``nvml_energy`` (the GPU's total-energy counter) and ``nvml_power`` (power
polled at ``poll_hz`` on a thread, trapezoid-integrated), both opened around the same
window of ViT-S full fine-tuning in bf16; they must agree within 5 %. Before it, the
same two meters over an idle window give the idle power, subtracted (and said so) for
the active energy. Exclusive use: the meters' own verdict (NVML lists one compute
process, this one, at both ends) and the process count NVML lists.

On a CPU the same code runs with ``rapl`` (when the powercap counters are readable)
and ``estimate``; the NVML figures are ``skipped: no CUDA``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from benchmarks.gpucheck import steps
from benchmarks.gpucheck.context import PartContext
from benchmarks.gpucheck.report import NO_CUDA, Target
from workers.energy import (
    EnergyConfig,
    EnergyMeasurement,
    EnergyMeter,
    NvmlPowerMeter,
    select_meter,
)

GPU_METERS = ("nvml_energy", "nvml_power")
CPU_METERS = ("rapl", "estimate")
AGREEMENT = 0.05


def run(ctx: PartContext) -> None:
    s = ctx.sizes.energy
    names = GPU_METERS if ctx.cuda else CPU_METERS
    step = steps.training_step(
        s.backbone, s.batch, ctx.device, ctx.sizes.precision, ctx.cuda, ctx.sizes.img_size
    )
    steps.seconds(step, ctx.device, 0, warmup=3)
    meters = _meters(ctx, names, s.poll_hz)
    idle = _window(meters, lambda: time.sleep(s.idle_s))
    count = [0]

    def train() -> None:
        end = time.perf_counter() + s.window_s
        while time.perf_counter() < end:
            step()
            count[0] += 1

    busy = _window(meters, train)
    ctx.figure("window_s", s.window_s, "s", "training time asked for (both meters open around it)")
    ctx.figure("window_steps", count[0], "steps", f"{s.backbone} batch {s.batch} steps run")
    for name, m in busy.items():
        idle_w = idle[name].avg_watts
        src = f"workers.energy {name} meter ({m.source})"
        ctx.figure(f"{name}.idle_w", idle_w, "W", f"{src}, {s.idle_s:g} s idle window")
        ctx.figure(f"{name}.window_s", m.seconds, "s", f"{src}: the window it measured")
        ctx.figure(f"{name}.window_j", m.joules, "J", f"{src}, training window")
        ctx.figure(f"{name}.avg_w", m.avg_watts, "W", f"{src}, training window")
        ctx.figure(
            f"{name}.active_j",
            m.joules - idle_w * m.seconds,
            "J",
            f"{src}: window J - idle W x window s (idle power subtracted)",
        )
        ctx.figure(
            f"{name}.exclusive",
            str(m.exclusive),
            "",
            f"{src}: EnergyMeasurement.exclusive (NVML process counts at both ends)",
        )
    for name in names:
        if name not in busy:
            ctx.skip(f"{name}.window_j", meters.get(name, "not available"), "J", name)
    _agreement(ctx, busy, idle)
    _poll_rate(ctx, meters, busy)
    _processes(ctx)


def _meters(
    ctx: PartContext, names: tuple[str, ...], poll_hz: float
) -> dict[str, EnergyMeter | str]:
    """Each meter asked for, or why it is not there (the trial would fall back)."""
    meters: dict[str, EnergyMeter | str] = {}
    for name in names:
        meter = select_meter(EnergyConfig(meter=name, poll_hz=poll_hz), ctx.device, exclusive=None)
        # the meter asked for was built when none was skipped before it
        meters[name] = f"skipped: unavailable: {meter.fallback}" if meter.fallback else meter
    return meters


def _window(
    meters: dict[str, EnergyMeter | str], work: Callable[[], None]
) -> dict[str, EnergyMeasurement]:
    """Open every available meter, run ``work``, close them in reverse order."""
    live = [(n, m) for n, m in meters.items() if isinstance(m, EnergyMeter)]
    for _, meter in live:
        meter.begin_window()
    try:
        work()
    finally:
        results = {n: m.end_window() for n, m in reversed(live)}
    return results


def _agreement(
    ctx: PartContext, busy: dict[str, EnergyMeasurement], idle: dict[str, EnergyMeasurement]
) -> None:
    source = "|nvml_energy - nvml_power| / nvml_energy over the same window"
    if not ctx.cuda:
        ctx.skip("agreement", NO_CUDA, "of counter", source)
        return
    if not all(n in busy for n in GPU_METERS):
        ctx.skip("agreement", "a meter is missing (see above)", "of counter", source)
        return
    counter, power = busy["nvml_energy"], busy["nvml_power"]
    ctx.figure(
        "agreement",
        abs(counter.joules - power.joules) / counter.joules,
        "of counter",
        source,
        Target("<=", AGREEMENT),
    )
    idle_c, idle_p = idle["nvml_energy"].avg_watts, idle["nvml_power"].avg_watts
    active_c = counter.joules - idle_c * counter.seconds
    active_p = power.joules - idle_p * power.seconds
    ctx.figure(
        "agreement_active",
        abs(active_c - active_p) / active_c,
        "of counter",
        source + ", each with its idle power subtracted",
    )


def _poll_rate(
    ctx: PartContext, meters: dict[str, EnergyMeter | str], busy: dict[str, EnergyMeasurement]
) -> None:
    """Power samples per second the poller achieved beside the training loop."""
    source = "nvml_power meter: samples taken / window s"
    meter = meters.get("nvml_power")
    if not isinstance(meter, NvmlPowerMeter) or "nvml_power" not in busy:
        ctx.skip("power_poll_hz", NO_CUDA if not ctx.cuda else "no nvml_power meter", "Hz", source)
        return
    ctx.figure(
        "power_poll_hz", meter.samples / busy["nvml_power"].seconds, "Hz", source, Target(">=", 10)
    )


def _processes(ctx: PartContext) -> None:
    source = "NVML nvmlDeviceGetComputeRunningProcesses after the window"
    if not ctx.cuda:
        ctx.skip("compute_processes", NO_CUDA, "processes", source)
        return
    from benchmarks.gpucheck.nvml import handle, processes_mb

    with handle(ctx.device) as gpu:
        count = len(processes_mb(gpu))
    ctx.figure(
        "compute_processes",
        count,
        "processes",
        source + " (1: this one, exclusive)",
        Target("==", 1),
    )
