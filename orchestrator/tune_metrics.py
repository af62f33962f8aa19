"""What a grid trial reports to Ray Tune: flat figures after every epoch, then its record.

Each epoch's result holds ``EPOCH_METRICS`` (``epoch`` is Tune's time attribute for the
schedulers); the last result holds the TrialRecord as JSON under ``record`` beside its
headline figures (``FINAL_METRICS``), without ``epoch``, so a scheduler never acts on it.
Tune's result files, ``ResultGrid`` and the logger callbacks (TensorBoard, MLflow,
W&B) see both. A trial that a scheduler stops never reports a record: the driver makes
its ``stopped`` record from the last epoch's result (``stopped_record``).
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any

from orchestrator.records import TrialRecord
from orchestrator.spec import TrialSpec

log = logging.getLogger(__name__)

EPOCH = "epoch"  # 1-based epochs completed: the schedulers' time attribute
# per-epoch metric -> (the direction that is better, what it is)
EPOCH_METRICS: dict[str, tuple[str, str]] = {
    "train_loss": ("min", "mean training loss of the epoch"),
    "val_accuracy": ("max", "top-1 accuracy on the validation split (when the dataset has one)"),
    "peak_mem_mb": ("min", "peak memory so far, MiB (CUDA allocator, or accounted on CPU)"),
    "energy_j": ("min", "energy of the training loop so far, J (per-epoch validation excluded)"),
    "step_time_s": ("min", "wall time per optimizer step in the epoch, s (the first has warm-up)"),
}
# which meter measured the epoch's peak_mem_mb and energy_j (record columns, strings)
EPOCH_SOURCES = ("mem_source", "energy_source")
# record columns repeated as flat figures in the last result (trackers plot them)
FINAL_METRICS = (
    "accuracy",
    "top5_accuracy",
    "val_accuracy",
    "loss",
    "train_loss",
    "peak_mem_mb",
    "energy_j",
    "train_time_s",
    "throughput_img_s",
    "params_trainable",
    "macs",
)


def epoch_result(figures: dict[str, Any]) -> dict[str, Any] | None:
    """The Tune result of a trial's live ``figures`` when they close an epoch, else None
    (the step reports in between go to the Ray gauges only)."""
    if EPOCH not in figures:
        return None
    result: dict[str, Any] = {k: float(figures[k]) for k in EPOCH_METRICS if k in figures}
    result.update({k: str(figures[k]) for k in EPOCH_SOURCES if figures.get(k)})
    result[EPOCH] = int(figures[EPOCH])
    if "step" in figures:
        result["step"] = int(figures["step"])
    return result


def final_result(record: TrialRecord) -> dict[str, Any]:
    """The last Tune result of a trial: its record as JSON, status, and flat figures."""
    result: dict[str, Any] = {"record": record.to_json(), "status": record.status}
    for name in FINAL_METRICS:
        value = getattr(record, name, None)
        if isinstance(value, int | float) and math.isfinite(value):
            result[name] = value
    return result


def stopped_record(spec: TrialSpec, last: dict[str, Any], reason: str) -> TrialRecord:
    """The record of a trial that a scheduler stopped after the epoch result ``last``:
    status ``stopped``, the figures of that epoch, and ``reason`` in ``error``."""
    epoch = last.get(EPOCH)
    record = TrialRecord(
        spec=spec,
        status="stopped",
        error=f"{reason} after epoch {epoch} of {spec.train.epochs}"
        if epoch is not None
        else reason,
        ended_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
    )
    for name in ("train_loss", "val_accuracy", "peak_mem_mb", "energy_j"):
        if isinstance(last.get(name), int | float):
            setattr(record, name, float(last[name]))
    for name in EPOCH_SOURCES:
        if isinstance(last.get(name), str):
            setattr(record, name, last[name])
    if isinstance(last.get("step"), int | float):
        record.steps = int(last["step"])
    return record


def latest_line(label: str, last: dict[str, Any], metric: str | None) -> str:
    """One running trial for the progress bar: ``label e2 val_accuracy=0.61``."""
    name = metric if metric in last else next((m for m in EPOCH_METRICS if m in last), None)
    shown = f" {name}={last[name]:.4g}" if name else ""
    return f"{label} e{last.get(EPOCH, '?')}{shown}"
