"""What a part gets (device, sizes, time left) and where its figures go.

Figures are written to the part's result file as soon as each is recorded (write a
temporary file, then rename), so a part killed at its limit keeps what it measured.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from benchmarks.gpucheck.report import NO_CUDA, Figure, Target
from benchmarks.gpucheck.sizes import Sizes

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class PartContext:
    name: str
    device: torch.device
    sizes: Sizes
    tiny: bool
    deadline: float  # time.monotonic() by which the part should have finished
    out: Path
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    status: str = "running"
    reason: str = ""

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def figure(
        self, name: str, value: Any, unit: str, source: str, target: Target | None = None
    ) -> None:
        """Record a measured figure (None: not measured, see ``skip``)."""
        if value is None:
            self.skip(name, "the measurement returned nothing", unit, source)
            return
        self.figures.append(Figure.of(name, value, unit, source, target))
        self.flush()

    def skip(self, name: str, reason: str, unit: str = "", source: str = "") -> None:
        self.figures.append(Figure.skip(name, reason, unit, source))
        self.flush()

    def cuda_figure(
        self, name: str, value: Any, unit: str, source: str, target: Target | None = None
    ) -> None:
        """A figure that only a GPU has: recorded as ``skipped: no CUDA`` on a CPU run."""
        if not self.cuda:
            self.skip(name, NO_CUDA, unit, source)
        else:
            self.figure(name, value, unit, source, target)

    def gpu_target(self, target: Target) -> Target | None:
        """``target`` on a GPU; none on a CPU, where the tiny sizes cannot show it."""
        return target if self.cuda else None

    def out_of_time(self, name: str, unit: str = "", source: str = "", need_s: float = 5) -> bool:
        """True, with ``name`` recorded as skipped, when under ``need_s`` of the part's
        time is left: what was measured is kept instead of the part being killed."""
        if self.time_left() >= need_s:
            return False
        self.skip(name, "the part's time limit is near", unit, source or "not measured")
        return True

    def attempt(self, label: str, measure: Callable[[], T]) -> T | None:
        """``measure()``; an exception it raises becomes the figure ``label.error`` (a
        missed target) and the part goes on with its next measurement."""
        try:
            return measure()
        except Exception as exc:  # noqa: BLE001 - one model's failure is a figure
            log.exception("%s failed", label)
            text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.figure(
                f"{label}.error",
                text[:200],
                "",
                "the exception that stopped this measurement (traceback in the log tail)",
                Target("==", "none"),
            )
            return None

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.flush()

    def finish(self, status: str, reason: str = "") -> None:
        self.status, self.reason = status, reason
        self.flush()

    def flush(self) -> None:
        doc = {
            "part": self.name,
            "status": self.status,
            "reason": self.reason,
            "figures": [f.to_dict() for f in self.figures],
            "notes": self.notes,
            "environment": self.environment,
        }
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.out)
