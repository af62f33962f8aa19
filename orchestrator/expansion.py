"""Grid -> TrialSpecs: the product of the axes, minus exclusions, plus baselines.

The grid's ``deploy:`` section (resolved) goes into every fine-tuning spec; baselines
train nothing and have no deployment phase.

Order is deterministic (the grid's order of each axis, seeds innermost), and each
spec's ``trial_id`` depends only on its content, so two expansions of the same grid
agree on every machine.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
from collections.abc import Iterator
from typing import Any

from orchestrator.grid import Grid
from orchestrator.spec import TrialSpec

log = logging.getLogger(__name__)


def excluded(spec: TrialSpec, rules: tuple[dict[str, tuple[Any, ...]], ...]) -> bool:
    return any(all(getattr(spec, axis) in vals for axis, vals in rule.items()) for rule in rules)


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """No cycle collection while 10^5 specs are made: they hold no cycles, and the
    collector's passes over them were a quarter of an expansion's time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def expand(grid: Grid) -> list[TrialSpec]:
    """All trials of ``grid``, fine-tuning first, then baselines (one per dataset x seed)."""
    with _no_collection():
        return _expand(grid)


def _expand(grid: Grid) -> list[TrialSpec]:
    specs = []
    for dataset, backbone, method, ckpt, budget, seed in itertools.product(
        grid.datasets, grid.backbones, grid.methods, grid.checkpointing, grid.budgets_mb, grid.seeds
    ):
        spec = TrialSpec(
            kind="finetune",
            backbone=backbone.name,
            backbone_args=backbone.args,
            method=method.name,
            method_args=method.args,
            checkpointing=ckpt.name,
            checkpointing_args=ckpt.args,
            dataset=dataset.name,
            dataset_args=dataset.args,
            budget_mb=budget,
            train=grid.train,
            seed=seed,
            deploy=grid.deploy,  # every fine-tuned model goes through the deployment phase
        )
        if not grid.exclude or not excluded(spec, grid.exclude):
            specs.append(spec)
    for baseline, dataset, budget, seed in itertools.product(
        grid.baselines, grid.datasets, grid.budgets_mb, grid.seeds
    ):
        args = dict(baseline.args)
        specs.append(
            TrialSpec(
                kind="baseline",
                backbone=str(args.pop("backbone", "")),
                method="",
                dataset=dataset.name,
                dataset_args=dataset.args,
                budget_mb=budget,
                train=grid.train,
                seed=seed,
                baseline=baseline.name,
                baseline_args=args,
            )
        )
    ids = [s.trial_id for s in specs]
    if len(set(ids)) != len(ids):  # only possible with identical axis entries
        raise ValueError("grid expansion produced duplicate trials")
    return specs
