"""Memory meters and the per-trial memory cap.

Two kinds of figure, never mixed up:

- *accounted* (any device): parameters + gradients + optimizer state + the bytes
  autograd saves for backward (a ``saved_tensors_hooks`` pack hook that sums unique
  storages). On CPU there is no allocator cap, so a trial whose accounted peak
  exceeds its budget is stopped and recorded as ``over_budget``.
- *cuda allocator* (CUDA only): the caching allocator's peaks, under a hard cap set
  with ``set_per_process_memory_fraction``; exceeding it is an ``oom`` record.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workers.rss_limit import RSS_MARGIN_MB as RSS_MARGIN_MB  # re-exported: the guard's margin
from workers.rss_limit import RSS_MARGIN_SHARE as RSS_MARGIN_SHARE
from workers.rss_limit import rss_limit_mb

log = logging.getLogger(__name__)

MB = 1024.0 * 1024.0


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (timings and meters read after it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OverBudget(RuntimeError):
    """The memory of a trial exceeded its budget: the accounted peak (CPU cap), the least
    it needs as predicted before allocating, or the process memory (RSS) guard."""

    def __init__(
        self,
        peak_mb: float,
        budget_mb: float,
        what: str = "accounted peak",
        phase: str = "training",
    ) -> None:
        super().__init__(f"{what} {peak_mb:.1f} MB exceeds the budget of {budget_mb:g} MB")
        self.peak_mb = peak_mb
        self.budget_mb = budget_mb
        self.phase = phase  # training | evaluation | inference | deployment


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_rss_high_water_mark() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0: ``clear_refs`` 5); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def rss_high_water_mark_bytes() -> int | None:
    """Peak RSS of this process since start or the last reset (``VmHWM``); None if unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssGuard:
    """Stops a CPU trial whose process memory grows past its budget plus a margin.

    The accounted cap sees tensors the trial saves; a single huge allocation the
    accounting does not predict (a giant input, a runaway op) would only be seen after
    the node's out-of-memory killer struck. ``check()`` (run before every block's
    forward and after every step) compares the growth of the resident set since the
    guard was made with ``budget + RSS_MARGIN_MB + RSS_MARGIN_SHARE * budget``
    (``workers.rss_limit``: the scheduler reserves the same on the trial's node).
    ``begin(phase)`` names the phase that a stop and ``peaks_mb`` report.
    """

    def __init__(self, budget_mb: float, margin_mb: float | None = None) -> None:
        self.budget_mb = budget_mb
        self.limit_mb = rss_limit_mb(budget_mb) if margin_mb is None else budget_mb + margin_mb
        self.baseline = rss_bytes()
        self.phase = "training"
        # growth of the resident set above the baseline, MiB, per phase: the largest of
        # the samples and of the kernel's high-water mark (where it can be reset)
        self.peaks_mb: dict[str, float] = {}
        self._hwm_reset = reset_rss_high_water_mark()

    def check(self, *_: Any) -> None:
        grown = (rss_bytes() - self.baseline) / MB
        self.peaks_mb[self.phase] = max(self.peaks_mb.get(self.phase, 0.0), grown)
        if grown > self.limit_mb:
            raise OverBudget(
                grown,
                self.budget_mb,
                f"process memory growth (RSS, limit {self.limit_mb:g} MB) in {self.phase}:",
                self.phase,
            )

    def begin(self, phase: str) -> None:
        """Close the current phase (its high-water mark read) and start ``phase``."""
        self.end()
        self.phase = phase
        self._hwm_reset = reset_rss_high_water_mark()
        self.check()

    def end(self) -> None:
        """Fold the kernel's high-water mark into the current phase's peak."""
        hwm = rss_high_water_mark_bytes() if self._hwm_reset else None
        if hwm is not None:
            grown = (hwm - self.baseline) / MB
            self.peaks_mb[self.phase] = max(self.peaks_mb.get(self.phase, 0.0), grown)

    def watch(self, blocks: list[tuple[str, nn.Module]]) -> list[Any]:
        """Check before every block's forward; returns the hook handles."""
        return [block.register_forward_pre_hook(self.check) for _, block in blocks]


def storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(address, bytes) of the storage under ``t``: tensors that share memory share it."""
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, meta or functional tensors
        return None
    return storage.data_ptr(), storage.nbytes()


class ActivationMeter:
    """Bytes autograd saves for backward during one forward, unique storages counted once.

    Parameters are excluded (they are counted as parameters). Use as a context
    manager around the forward pass; ``peak_bytes`` is the largest forward seen.

    Example:
        >>> meter = ActivationMeter(model)
        >>> with meter:
        ...     loss = model(x).sum()
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[tuple[str, nn.Module]] = (),
        exclude: Sequence[torch.Tensor] = (),
    ) -> None:
        self._exclude = {storage_key(t) for t in [*model.parameters(), *exclude]}
        self.peak_bytes = 0
        self.last_bytes = 0  # the last forward's (a re-planned step is judged on its own)
        self._seen: set[tuple[int, int]] = set()
        self._bytes = 0
        self._hooks: Any = None
        self._active = False
        # bytes saved before each of ``blocks`` started, in the last forward: what is
        # still alive while that block's backward runs
        self.entry_bytes: dict[str, int] = {}
        self._handles = [
            block.register_forward_pre_hook(self._entry_hook(name)) for name, block in blocks
        ]

    def remove(self) -> None:
        """Detach the block hooks (a meter that is not used again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _entry_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if self._active:
                self.entry_bytes[name] = self._bytes

        return hook

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key is not None and key not in self._exclude and key not in self._seen:
            self._seen.add(key)
            self._bytes += key[1]
        return t

    def __enter__(self) -> ActivationMeter:
        self._seen.clear()
        self._bytes = 0
        self._active = True
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self._active = False
        self.peak_bytes = max(self.peak_bytes, self._bytes)
        self.last_bytes = self._bytes
        self._seen.clear()


@dataclass
class MemoryAccount:
    """Accounted bytes of a training step, by kind."""

    params_bytes: int = 0  # every parameter and buffer, trainable or frozen
    grads_bytes: int = 0  # one gradient per trainable parameter
    optimizer_bytes: int = 0  # optimizer state tensors (AdamW: two per trainable parameter)
    activations_bytes: int = 0  # peak bytes saved for backward in one forward
    batch_bytes: int = 0  # the input batch on the device

    @property
    def peak_bytes(self) -> int:
        return (
            self.params_bytes
            + self.grads_bytes
            + self.optimizer_bytes
            + self.activations_bytes
            + self.batch_bytes
        )


def _nbytes(tensors: Any) -> int:
    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        key = storage_key(t)
        if key is not None:
            seen[key] = key[1]
    return sum(seen.values())


def account(
    model: nn.Module, optimizer: torch.optim.Optimizer, activations_bytes: int, batch_bytes: int
) -> MemoryAccount:
    """Accounted memory of ``model`` trained by ``optimizer`` (after its first step)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return MemoryAccount(
        params_bytes=_nbytes([*model.parameters(), *model.buffers()]),
        grads_bytes=sum(p.numel() * p.element_size() for p in trainable),
        optimizer_bytes=_nbytes(state),
        activations_bytes=activations_bytes,
        batch_bytes=batch_bytes,
    )


def predicted_static_bytes(model: nn.Module, optimizer: str, batch_bytes: int) -> int:
    """Accounted bytes of a step besides activations, before the optimizer exists:
    parameters and buffers, one gradient per trainable parameter, the optimizer state
    (AdamW: two moments; SGD with momentum: one) and the input batch."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    states = {"adamw": 2, "sgd": 1}[optimizer]
    return (
        _nbytes([*model.parameters(), *model.buffers()])
        + trainable
        + states * trainable
        + batch_bytes
    )


# ---------------------------------------------------------------- CUDA boundary


def configure_cuda_allocator() -> None:
    """Ask for expandable segments (less fragmentation under a tight cap).

    Must run before the first CUDA allocation of the process; a value set by the
    user is left alone.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def cap_cuda_memory(budget_mb: float, device: torch.device) -> float:
    """Cap the caching allocator of ``device`` at ``budget_mb``; returns the fraction set."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, budget_mb * MB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    torch.cuda.reset_peak_memory_stats(device)
    return fraction


def cuda_peaks(device: torch.device) -> dict[str, float]:
    """Allocator peaks of ``device`` in MB since the last reset."""
    torch.cuda.synchronize(device)
    stats = torch.cuda.memory_stats(device)
    return {
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated(device) / MB,
        "cuda_max_reserved_mb": torch.cuda.max_memory_reserved(device) / MB,
        # what the program asked for, before the allocator rounded it up
        "cuda_max_requested_mb": stats.get("requested_bytes.all.peak", 0) / MB,
    }


def pci_bus_id(device: torch.device) -> str:
    """The PCI bus id NVML names ``device`` by (CUDA and NVML number GPUs differently)."""
    props = torch.cuda.get_device_properties(device)
    return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"


def nvml_process_mb(device: torch.device, pid: int | None = None) -> float | None:
    """Device memory NVML attributes to this process (CUDA context included), MiB.

    None where NVML is missing, fails, or does not list the process (e.g. inside a
    container without the host PID namespace).
    """
    try:
        import pynvml
    except ImportError:
        return None
    pid = os.getpid() if pid is None else pid
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id(device))
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    return proc.usedGpuMemory / MB
            return None
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        log.info("NVML unavailable: %s", exc)
        return None


# CUDA context of a process when NVML cannot measure it (CUDA 12-13 on recent GPUs
# take 300-600 MiB: kernels of torch and cuBLAS/cuDNN handles)
DEFAULT_CONTEXT_MB = 512.0


def cuda_context_probe() -> tuple[float, float]:
    """(total memory of GPU 0, memory its CUDA context takes in this process), MiB.

    Runs on a GPU node before a sweep (the scheduler packs trials by it): the context
    is created by a one-element allocation, then measured by NVML for this process
    (allocator bytes excluded); ``DEFAULT_CONTEXT_MB`` where NVML cannot tell.
    """
    device = torch.device("cuda", 0)
    probe = torch.zeros(1, device=device)
    total = torch.cuda.get_device_properties(device).total_memory / MB
    used = nvml_process_mb(device)
    reserved = torch.cuda.memory_reserved(device) / MB
    del probe
    context = used - reserved if used is not None else DEFAULT_CONTEXT_MB
    return total, max(context, 0.0)
