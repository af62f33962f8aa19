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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

MB = 1024.0 * 1024.0


class OverBudget(RuntimeError):
    """The accounted peak memory of a trial exceeded its budget (CPU cap)."""

    def __init__(self, peak_mb: float, budget_mb: float) -> None:
        super().__init__(f"accounted peak {peak_mb:.1f} MB exceeds the budget of {budget_mb:g} MB")
        self.peak_mb = peak_mb
        self.budget_mb = budget_mb


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
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

    def __init__(self, model: nn.Module) -> None:
        self._exclude = {_storage_key(p) for p in model.parameters()}
        self.peak_bytes = 0
        self._seen: set[tuple[int, int]] = set()
        self._bytes = 0
        self._hooks: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key not in self._exclude and key not in self._seen:
            self._seen.add(key)
            self._bytes += key[1]
        return t

    def __enter__(self) -> ActivationMeter:
        self._seen.clear()
        self._bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self.peak_bytes = max(self.peak_bytes, self._bytes)
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
        key = _storage_key(t)
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
    return {
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated(device) / MB,
        "cuda_max_reserved_mb": torch.cuda.max_memory_reserved(device) / MB,
    }
