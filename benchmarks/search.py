"""Constrained search vs random search vs the full grid, on a synthetic landscape.

The landscape is a deterministic function of a TrialSpec (no training): accuracy from
the backbone's quality, the method (and LoRA rank), the distance of the learning rate
from the method's best, the batch size and the epochs; peak memory from the weights,
the trainable share (gradients, AdamW state) and the activations that checkpointing
keeps; energy and time from the epochs, the backbone's compute, the method and the
recompute of checkpointing. The memory budget and an energy limit cut off the most
accurate configurations (full fine-tuning of the largest backbone without
checkpointing, long runs), so the feasible optimum is an interior trade-off. Full
fine-tuning diverges (a ``failed`` record) above a learning rate of 0.03. Each trial
reports its validation accuracy once per epoch, for the pruner.

For each seed, ``orchestrator.search.run_search`` runs with the constrained TPE sampler
and with random search (same space, same limits, ``InProcessRunner``); the figure is
the number of study trials until a feasible trial reaches 95% of the best feasible
accuracy (``--trials`` + 1 when none did), median over the seeds. The full grid is the
same space with the learning rate on 7 values: its size, and the trials it takes in
its expansion order.

    .venv/bin/python benchmarks/search.py [--seeds 7] [--trials 150]
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import optuna

from orchestrator.grid import Grid, parse_grid
from orchestrator.records import RecordStore, TrialRecord
from orchestrator.search import InProcessRunner, run_search
from orchestrator.spec import TrainConfig, TrialSpec

# backbone -> (accuracy it can reach, parameters in millions, activation MiB per image
# without checkpointing, compute per image relative to vit_test)
BACKBONES = {
    "vit_test": (0.80, 1.0, 0.10, 1.0),
    "vim_test": (0.84, 1.5, 0.16, 1.4),
    "mambavision_test": (0.87, 2.5, 0.24, 1.8),
    "tiny_vit_test": (0.91, 4.0, 0.36, 2.4),
}
# method -> (best learning rate, share of parameters trained, relative time per step)
METHODS = {"full": (1e-3, 1.0, 1.0), "lora": (1e-2, 0.0, 0.8), "bitfit": (3e-2, 0.01, 0.7)}
# checkpointing -> (share of activations kept, relative time per step)
CHECKPOINTING = {"none": (1.0, 1.0), "static": (0.3, 1.33), "adaptive": (0.55, 1.12)}
BUDGET_MB = 48.0
ENERGY_LIMIT_J = 800.0
WATTS = 50.0  # energy -> training time
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # the full grid's learning rates
TARGET = 0.95  # share of the best feasible accuracy that counts as found


def grid(output: str, sampler: str = "tpe", seed: int = 0, trials: int = 150) -> dict[str, Any]:
    """The landscape's grid with its search section (validated by ``parse_grid``)."""
    return {
        "name": "landscape",
        "output": output,
        "budget_mb": BUDGET_MB,
        "seeds": [0],
        "datasets": {"synthetic": {"val_fraction": 0.2}},  # the pruner reads validation
        "backbones": list(BACKBONES),
        "methods": {"full": {}, "lora": {"r": 8}, "bitfit": {}},
        "checkpointing": list(CHECKPOINTING),
        "train": {"epochs": 3, "batch_size": 32, "lr": 1.0e-3},
        "search": {
            "objectives": ["accuracy"],
            "constraints": {"energy_j": ENERGY_LIMIT_J},
            "space": {
                "train": {
                    "lr": {"low": LRS[0], "high": LRS[-1], "log": True},
                    "batch_size": [16, 32, 64, 128],
                    "epochs": {"low": 1, "high": 8},
                },
                "methods": {"lora": {"r": [2, 4, 8, 16, 32]}},
            },
            "trials": trials,
            "sampler": sampler,
            "seed": seed,
            "startup_trials": 10,
            "n_parallel": 1,
        },
    }


def accuracy_after(spec: TrialSpec, epochs: int) -> float:
    """Accuracy of the spec's configuration after ``epochs`` epochs."""
    quality = BACKBONES[spec.backbone][0]
    best_lr, _, _ = METHODS[spec.method]
    bonus = {"full": 0.04, "bitfit": -0.03}.get(spec.method, 0.0)
    if spec.method == "lora":
        bonus = 0.035 * (1 - math.exp(-spec.method_args["r"] / 6)) - 0.005
    lr_miss = math.log10(spec.train.lr / best_lr) ** 2
    bs_miss = math.log2(spec.train.batch_size / 32) ** 2
    ceiling = quality + bonus - 0.08 * lr_miss - 0.015 * bs_miss
    return max(0.05, ceiling * (1 - 0.6 * math.exp(-epochs / 2)))


def costs(spec: TrialSpec) -> tuple[float, float]:
    """(peak memory MiB, training energy J) of the spec's configuration."""
    _, params_m, act_mb, compute = BACKBONES[spec.backbone]
    _, share, step_time = METHODS[spec.method]
    if spec.method == "lora":
        share = 0.002 * spec.method_args["r"]
    kept, recompute = CHECKPOINTING[spec.checkpointing]
    weights_mb = params_m * 4  # fp32
    memory = weights_mb * (1 + 3 * share) + spec.train.batch_size * act_mb * kept
    per_epoch = 60.0 * compute * step_time * recompute * (1 + 8 / spec.train.batch_size)
    return memory, per_epoch * spec.train.epochs


def trial(spec: TrialSpec, progress: Callable[[dict[str, float]], None]) -> TrialRecord:
    """The synthetic trial kind: a record from the landscape, validation accuracy per epoch."""
    memory, energy = costs(spec)
    params = int(BACKBONES[spec.backbone][1] * 1e6)
    record = TrialRecord(spec=spec, peak_mem_mb=memory, params_total=params, macs=params * 200)
    if memory > spec.budget_mb:
        record.status, record.error = "over_budget", f"accounted {memory:.1f} MiB"
        return record
    if spec.method == "full" and spec.train.lr > 0.03:
        record.error = "loss diverged"
        return record
    for epoch in range(1, spec.train.epochs + 1):
        progress({"epoch": epoch, "val_accuracy": accuracy_after(spec, epoch)})
    record.status = "ok"
    record.accuracy = accuracy_after(spec, spec.train.epochs)
    record.energy_j, record.train_time_s = energy, energy / WATTS
    return record


def feasible(record: TrialRecord) -> bool:
    return (
        record.status == "ok"
        and record.peak_mem_mb is not None
        and record.peak_mem_mb <= record.spec.budget_mb
        and record.energy_j is not None
        and record.energy_j <= ENERGY_LIMIT_J
    )


def full_grid(base: Grid) -> list[TrialSpec]:
    """The search space as a grid (learning rate on ``LRS``), in expansion order."""
    assert base.search is not None
    dims = {d.name: d for d in base.search.train}
    epochs = range(int(dims["epochs"].low or 1), int(dims["epochs"].high or 1) + 1)
    ranks = base.search.method_args["lora"][0].choices
    specs = []
    for backbone, method, ckpt, lr, bs, ep in itertools.product(
        base.backbones, base.methods, base.checkpointing, LRS, dims["batch_size"].choices, epochs
    ):
        for r in ranks if method.name == "lora" else [None]:
            args = dict(method.args) if r is None else {**method.args, "r": r}
            specs.append(
                TrialSpec(
                    backbone=backbone.name,
                    method=method.name,
                    method_args=args,
                    checkpointing=ckpt.name,
                    dataset="synthetic",
                    budget_mb=base.search.budget_mb,
                    train=TrainConfig(lr=lr, batch_size=bs, epochs=ep),
                    seed=0,
                )
            )
    return specs


def best_feasible(specs: list[TrialSpec]) -> float:
    """The best feasible accuracy of the landscape (its optimum lies on the grid's values)."""
    records = [trial(s, lambda _: None) for s in specs]
    return max(r.accuracy for r in records if feasible(r) and r.accuracy is not None)


class _Found(BaseException):
    """Raised by the trial that reaches the target: the search has done its job."""


def trials_to_target(
    sampler: str, seed: int, trials: int, target: float, storage: str = ""
) -> tuple[int, int]:
    """(study trials, trials run) until a feasible trial reaches ``target`` (``trials`` + 1
    when none did): a search in a fresh output folder, stopped at its first hit."""
    with tempfile.TemporaryDirectory() as out:
        spec = grid(out, sampler, seed, trials)
        spec["search"]["storage"] = storage
        told, runs = [0], [0]

        def counting(spec: TrialSpec, progress: Callable[[dict[str, float]], None]) -> TrialRecord:
            runs[0] += 1
            record = trial(spec, progress)
            if feasible(record) and (record.accuracy or 0.0) >= target:
                raise _Found
            return record

        def echo(line: str) -> None:
            told[0] += 1

        try:
            run_search(
                parse_grid(spec), RecordStore(out), lambda _: InProcessRunner(counting), echo=echo
            )
        except _Found:
            return told[0] + 1, runs[0]  # trials told before it, then the hit itself
        return trials + 1, runs[0] + 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=7)
    parser.add_argument("--trials", type=int, default=150, help="trials per search")
    parser.add_argument(
        "--storage",
        default="sqlite:///:memory:",
        help="Optuna storage of each search ('' = the SQLite file of the real default)",
    )
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study created

    base = parse_grid(grid(tempfile.gettempdir()))
    specs = full_grid(base)
    best = best_feasible(specs)
    target = TARGET * best
    records = [trial(s, lambda _: None) for s in specs]
    hits = [i for i, r in enumerate(records) if feasible(r) and (r.accuracy or 0) >= target]
    share = len(hits) / len(specs)
    print(
        f"landscape: {len(specs)} grid configurations, {sum(map(feasible, records))} feasible; "
        f"best feasible accuracy {best:.4f}; target {target:.4f} ({TARGET:.0%}), "
        f"reached by {share:.2%} of the grid"
    )
    print(f"{'strategy':<24}{'median trials':>14}{'(runs)':>8}  per seed (trials)")
    for sampler, name in (("tpe", "constrained TPE"), ("random", "random search")):
        t0 = time.perf_counter()
        found = [
            trials_to_target(sampler, s, args.trials, target, args.storage)
            for s in range(args.seeds)
        ]
        study_trials = [f[0] for f in found]
        runs = [f[1] for f in found]
        print(
            f"{name:<24}{statistics.median(study_trials):>14g}{statistics.median(runs):>8g}  "
            f"{study_trials}  ({time.perf_counter() - t0:.1f} s)"
        )
    print(f"{'full grid (in order)':<24}{hits[0] + 1:>14}{hits[0] + 1:>8}  of {len(specs)}")
    print(f"(a search that never reached the target counts as {args.trials + 1})")


if __name__ == "__main__":
    main()
