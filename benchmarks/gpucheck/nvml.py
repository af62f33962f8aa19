"""What the check reads from NVML directly (the trial's meters read the rest): the
compute processes on the GPU and their memory, sampled while packed trials run, and
the GPU's top SM clock. NVML numbers GPUs by PCI bus id (``workers.memory.pci_bus_id``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.memory import MB, pci_bus_id

log = logging.getLogger(__name__)


@contextmanager
def handle(device: torch.device) -> Iterator[Any]:
    """The NVML handle of ``device`` while the block runs (pynvml from nvidia-ml-py)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        yield pynvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id(device))
    finally:
        pynvml.nvmlShutdown()


def processes_mb(gpu: Any) -> dict[int, float]:
    """Compute processes on the GPU: pid -> device memory NVML attributes to it, MiB."""
    import pynvml

    return {
        p.pid: (p.usedGpuMemory or 0) / MB for p in pynvml.nvmlDeviceGetComputeRunningProcesses(gpu)
    }


def max_sm_clock_mhz(device: torch.device) -> float | None:
    import pynvml

    try:
        with handle(device) as gpu:
            return float(pynvml.nvmlDeviceGetMaxClockInfo(gpu, pynvml.NVML_CLOCK_SM))
    except pynvml.NVMLError as exc:
        log.info("NVML max SM clock: %s", exc)
        return None


@dataclass
class MemorySampler:
    """Polls the GPU's memory every ``interval_s`` on a thread while open: the largest
    figure seen per process and for the whole device."""

    device: torch.device
    interval_s: float = 0.2
    per_process_mb: dict[int, float] = field(default_factory=dict)
    device_used_mb: float = 0.0
    samples: int = 0
    error: str = ""

    def __enter__(self) -> MemorySampler:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import pynvml

        try:
            with handle(self.device) as gpu:
                while not self._stop.is_set():
                    for pid, used in processes_mb(gpu).items():
                        self.per_process_mb[pid] = max(self.per_process_mb.get(pid, 0.0), used)
                    used = pynvml.nvmlDeviceGetMemoryInfo(gpu).used / MB
                    self.device_used_mb = max(self.device_used_mb, used)
                    self.samples += 1
                    self._stop.wait(self.interval_s)
        except pynvml.NVMLError as exc:
            self.error = f"NVML: {exc}"
