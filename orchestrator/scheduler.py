"""The grid's ``scheduler:`` section: Ray Tune's early stopping of hopeless trials.

A grid sweep (``orchestrate run``) may hand its trials' per-epoch results
(``orchestrator.tune_metrics``) to one of Tune's trial schedulers; a trial it stops is
recorded with status ``stopped`` and its figures so far. ``orchestrate search`` has its
own pruner (``search.pruner``) and ignores this section.

Example (YAML)::

    scheduler: {name: asha, metric: val_accuracy, grace_period: 1, reduction_factor: 3}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from orchestrator.spec import is_int, is_number
from orchestrator.tune_metrics import EPOCH_METRICS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerKind:
    """A registered scheduler: Ray Tune's class in ``ray.tune.schedulers`` and the
    section's optional fields it takes (passed under the same names)."""

    tune_class: str
    fields: tuple[str, ...]
    doc: str
    # takes max_t, the epochs of the longest trial (and would stop a trial there)
    bounded: bool = False


# asha: Li et al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020
# (https://arxiv.org/abs/1810.05934); median_stopping: Golovin et al., "Google Vizier",
# KDD 2017
SCHEDULERS: dict[str, SchedulerKind] = {
    "asha": SchedulerKind(
        "ASHAScheduler",
        ("grace_period", "reduction_factor"),
        "asynchronous successive halving: at epochs grace_period * reduction_factor^k a "
        "trial goes on only when it is in the best 1/reduction_factor at that epoch",
        bounded=True,
    ),
    "median_stopping": SchedulerKind(
        "MedianStoppingRule",
        ("grace_period", "min_samples_required"),
        "stops a trial whose best result is worse than the median of the other trials' "
        "running averages at the same epoch",
    ),
}


@dataclass(frozen=True)
class Scheduler:
    """The ``scheduler:`` section. Time is counted in epochs (``epoch``)."""

    name: str = "asha"  # a SCHEDULERS name
    metric: str = "val_accuracy"  # a per-epoch metric (tune_metrics.EPOCH_METRICS)
    mode: str = ""  # min | max; "" is the metric's own direction (accuracy max, else min)
    grace_period: int | None = None  # epochs every trial runs before it can be stopped
    reduction_factor: float | None = None  # asha: keeps 1/reduction_factor per rung (2)
    min_samples_required: int | None = None  # median_stopping: trials to compare with (3)

    def __post_init__(self) -> None:
        kind = SCHEDULERS.get(self.name) if isinstance(self.name, str) else None
        if kind is None:
            raise ValueError(f"name must be one of {sorted(SCHEDULERS)}, got {self.name!r}")
        if not isinstance(self.metric, str) or self.metric not in EPOCH_METRICS:
            raise ValueError(
                f"metric must be a per-epoch metric, one of {list(EPOCH_METRICS)}, "
                f"got {self.metric!r}"
            )
        if self.mode not in ("", "min", "max"):
            raise ValueError(f"mode must be min or max, got {self.mode!r}")
        for field in ("grace_period", "reduction_factor", "min_samples_required"):
            if getattr(self, field) is not None and field not in kind.fields:
                raise ValueError(
                    f"{field} is not an option of {self.name} (its options: "
                    f"{', '.join(kind.fields)})"
                )
        for field in ("grace_period", "min_samples_required"):
            value = getattr(self, field)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        rf = self.reduction_factor
        if rf is not None and (not is_number(rf) or not 1 < rf <= 100):
            raise ValueError(f"reduction_factor must be a number in (1, 100], got {rf!r}")

    @property
    def direction(self) -> str:
        """min or max: which values of ``metric`` are better."""
        return self.mode or EPOCH_METRICS[self.metric][0]

    def options(self, epochs: int) -> dict[str, object]:
        """Keyword arguments of the Tune class, for trials of at most ``epochs`` epochs."""
        options: dict[str, object] = {
            "time_attr": "epoch",
            "metric": self.metric,
            "mode": self.direction,
        }
        for field in SCHEDULERS[self.name].fields:
            if getattr(self, field) is not None:
                options[field] = getattr(self, field)
        options.setdefault("grace_period", 1)  # Tune's median rule counts 60 (seconds)
        if SCHEDULERS[self.name].bounded:
            options["max_t"] = max(epochs, int(options["grace_period"]))
            # a trial that reaches max_t must go on to report its record, not be stopped
            options["stop_last_trials"] = False
        return options
