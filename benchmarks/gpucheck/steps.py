"""A training step on one fixed batch, timed and metered (airbench-style measuring).

Timings wait for the device before and after (``torch.cuda.synchronize``), exclude
warm-up steps and report the median. Peak memory of a step is the CUDA allocator's
peak during it minus what was allocated before it (weights, gradients, optimizer
state, the batch): the step's own transient memory.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.backbones import create_backbone, input_size
from workers.memory import MB, sync

NUM_CLASSES = 10


def autocast(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A fresh autocast context per call (the trial's precision rule: fp32 none)."""
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


@dataclass
class Step:
    """Forward, cross-entropy, backward and (with an optimizer) an optimizer step."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    context: Callable[[], AbstractContextManager]
    optimizer: torch.optim.Optimizer | None = None

    def loss(self) -> torch.Tensor:
        with self.context():
            return F.cross_entropy(self.model(self.x).float(), self.y)

    def __call__(self) -> None:
        loss = self.loss()
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)

    @property
    def device(self) -> torch.device:
        return self.x.device


def training_step(
    backbone: str,
    batch: int,
    device: torch.device,
    precision: str,
    fused: bool = False,
    img_size: int = 0,
) -> Step:
    """Full fine-tuning of ``backbone`` (random init, ``img_size`` px; 0: its native size)
    with AdamW on one random batch."""
    torch.manual_seed(0)
    args = {"img_size": img_size} if img_size else {}
    model = create_backbone(backbone, num_classes=NUM_CLASSES, **args).to(device).train()
    size = input_size(model)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
    return Step(model, x, y, autocast(precision, device), optimizer)


def seconds(
    fn: Callable[[], None], device: torch.device, steps: int, warmup: int = 0
) -> list[float]:
    """Wall time of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000.0


def step_peak_mb(fn: Callable[[], None], device: torch.device) -> float | None:
    """CUDA allocator peak during one call of ``fn`` above what was allocated before it,
    MiB; None on a CPU (no allocator to read)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MB


def free_cuda() -> None:
    """Give back what the last measurement cached (the next one starts clean)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
