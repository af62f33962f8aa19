"""Hard cap: one trial per checkpointing strategy under the budget, in one process.

ViT-S/16 at 224 px, batch 64, LoRA, 2 GiB: ``none`` must end as an ``oom`` record (the
allocator cap stops it; on a CPU the accounted cap makes it ``over_budget``), the process
must go on to run ``static`` and ``adaptive``, which fit. Each record's allocator peaks
(the cap applies to reserved memory) stay under the budget; NVML's figure for the process
(CUDA context included) is recorded beside them.
"""

from __future__ import annotations

import torch

from benchmarks.gpucheck import trials
from benchmarks.gpucheck.context import PartContext
from benchmarks.gpucheck.report import Target
from orchestrator.records import TrialRecord
from workers.memory import MB
from workers.trial import run_trial

STRATEGIES = ("none", "static", "adaptive")
REC = "run_trial record"


def run(ctx: PartContext) -> None:
    s = ctx.sizes.cap
    data = trials.dataset(ctx.sizes)
    expected_none = "oom" if ctx.cuda else "over_budget"
    ran_after_oom = 0
    for strategy in STRATEGIES:
        spec = trials.spec(
            ctx.sizes,
            ctx.device.type,
            backbone=s.backbone,
            method="lora",
            batch=s.batch,
            steps=s.steps,
            budget_mb=s.budget_mb,
            checkpointing=strategy,
            checkpointing_args={"margin_mb": s.margin_mb} if strategy == "adaptive" else None,
        )
        record = run_trial(spec, num_threads=ctx.sizes.threads, data=data)
        expected = expected_none if strategy == "none" else "ok"
        ctx.figure(f"{strategy}.status", record.status, "", f"{REC}.status", Target("==", expected))
        if record.status != expected:
            ctx.note(f"{strategy}: {record.status}: {trials.first_line(record.error)}")
        _memory(ctx, strategy, record, s.budget_mb)
        if strategy == "none":
            _left_after(ctx)
        elif record.status == "ok":
            ran_after_oom += 1
            _fitted(ctx, strategy, record)
    ctx.figure(
        "trials_ok_after_none_in_same_process",
        ran_after_oom,
        "trials",
        "records of static and adaptive, run in the process none ran in",
        Target("==", len(STRATEGIES) - 1),
    )


def _fitted(ctx: PartContext, strategy: str, record: TrialRecord) -> None:
    """Speed and plan of a strategy that fitted; adaptive's prediction beside its peaks."""
    ctx.figure(
        f"{strategy}.images_per_s",
        record.throughput_img_s,
        "img/s",
        f"{REC}.throughput_img_s (first step excluded)",
    )
    ctx.figure(
        f"{strategy}.plan",
        trials.plan_counts(record),
        trials.PLAN_LABEL,
        f"{REC}.ckpt_plan (blocks per mode)",
    )
    if strategy == "adaptive":
        ctx.figure(
            "adaptive.predicted_peak_mb",
            record.ckpt_predicted_peak_mb,
            "MiB",
            f"{REC}.ckpt_predicted_peak_mb (the plan's accounted prediction)",
        )
        ctx.figure("adaptive.replans", record.ckpt_replans, "re-plans", f"{REC}.ckpt_replans")


def _memory(ctx: PartContext, strategy: str, record: TrialRecord, budget_mb: float) -> None:
    under = Target("<=", budget_mb)
    ctx.cuda_figure(
        f"{strategy}.cuda_max_allocated_mb",
        record.cuda_max_allocated_mb,
        "MiB",
        f"{REC}.cuda_max_allocated_mb (torch.cuda.max_memory_allocated)",
        under,
    )
    ctx.cuda_figure(
        f"{strategy}.cuda_max_reserved_mb",
        record.cuda_max_reserved_mb,
        "MiB",
        f"{REC}.cuda_max_reserved_mb (torch.cuda.max_memory_reserved: what the cap limits)",
        under,
    )
    ctx.cuda_figure(
        f"{strategy}.nvml_process_mb",
        record.nvml_process_mb,
        "MiB",
        f"{REC}.nvml_process_mb (NVML usedGpuMemory of the process, CUDA context "
        "included, read at the end of training)",
    )
    accounted = record.accounted_peak_mb
    if accounted is None and record.peak_mem_mb is not None and not ctx.cuda:
        accounted = record.peak_mem_mb  # an over_budget record keeps the peak that stopped it
    target = None if ctx.cuda or strategy == "none" else under
    ctx.figure(
        f"{strategy}.accounted_peak_mb",
        accounted,
        "MiB",
        f"{REC}.accounted_peak_mb (params + grads + optimizer + saved activations "
        "+ batch; the cap on a CPU)",
        target,
    )


def _left_after(ctx: PartContext) -> None:
    """Device memory still allocated after the out-of-memory trial returned its record."""
    if not ctx.cuda:
        ctx.skip("allocated_after_oom_mb", "skipped: no CUDA", "MiB", "torch.cuda.memory_allocated")
        return
    left = torch.cuda.memory_allocated(ctx.device) / MB
    ctx.figure(
        "allocated_after_oom_mb",
        left,
        "MiB",
        "torch.cuda.memory_allocated after run_trial returned the oom record",
        Target("<=", 64),
    )
