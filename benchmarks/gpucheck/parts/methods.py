"""Methods on CUDA: one short trial of every PEFT method at real backbone sizes.

Each method trains ``steps`` steps through ``run_trial`` under the 2 GiB cap (adaptive
checkpointing, as the paper grid would run it) on ViT-S/16, ``mobiletl`` on MobileNetV2:
status ok, every step taken, the loss of the last steps below that of the first ones
(from the trial's own per-step progress reports), and its peak memory. QLoRA needs
bitsandbytes, which the device image lacks: without its wheel it is skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import statistics

from benchmarks.gpucheck import steps, trials
from benchmarks.gpucheck.context import PartContext
from benchmarks.gpucheck.report import Target
from orchestrator.records import TrialRecord

TRANSFORMER_METHODS = ("full", "lora", "adalora", "qlora", "bitfit", "snella", "lbp_wht")
CNN_METHODS = ("mobiletl",)
WINDOW = 5  # steps averaged at each end of the loss curve
REC = "run_trial record"


def run(ctx: PartContext) -> None:
    s = ctx.sizes.methods
    data = trials.dataset(ctx.sizes)
    cases = [(m, s.transformer) for m in TRANSFORMER_METHODS]
    cases += [(m, s.cnn) for m in CNN_METHODS]
    for method, backbone in cases:
        if ctx.out_of_time(f"{method}.status", "", f"{REC}.status", need_s=8):
            continue
        if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
            ctx.skip(
                "qlora.status",
                "bitsandbytes is not installed (not in the device image; "
                "carry its wheel: docs/gpu_check.md)",
                "",
                f"{REC}.status",
            )
            continue
        spec = trials.spec(
            ctx.sizes,
            ctx.device.type,
            backbone=backbone,
            method=method,
            batch=s.batch,
            steps=s.steps,
            budget_mb=s.budget_mb,
            checkpointing=s.checkpointing,
            checkpointing_args={"margin_mb": s.margin_mb}
            if s.checkpointing == "adaptive"
            else None,
            lr=s.lr,
        )
        record, losses = trials.run_with_losses(spec, data, threads=ctx.sizes.threads)
        _figures(ctx, method, backbone, record, losses, s.steps, s.budget_mb)
        steps.free_cuda()


def _figures(
    ctx: PartContext,
    method: str,
    backbone: str,
    record: TrialRecord,
    losses: list[float],
    n: int,
    budget_mb: float,
) -> None:
    ctx.figure(
        f"{method}.status", record.status, "", f"{REC}.status ({backbone})", Target("==", "ok")
    )
    if record.status != "ok":
        ctx.note(f"{method}: {record.status}: {trials.first_line(record.error)}")
        return
    ctx.figure(f"{method}.steps", record.steps, "steps", f"{REC}.steps", Target("==", n))
    if len(losses) >= 2 * WINDOW:
        first, last = statistics.mean(losses[:WINDOW]), statistics.mean(losses[-WINDOW:])
        source = f"mean training loss of the first / last {WINDOW} steps (progress reports)"
        ctx.figure(f"{method}.loss_first", first, "nats", source)
        ctx.figure(f"{method}.loss_last", last, "nats", source)
        ctx.figure(
            f"{method}.loss_decreasing",
            last < first,
            "",
            "loss_last < loss_first",
            Target("==", True),
        )
    else:
        ctx.skip(
            f"{method}.loss_decreasing",
            f"only {len(losses)} step losses reported",
            "",
            "progress reports",
        )
    source = f"{REC}.peak_mem_mb ({record.mem_source})"
    ctx.figure(f"{method}.peak_mem_mb", record.peak_mem_mb, "MiB", source, Target("<=", budget_mb))
    ctx.figure(
        f"{method}.params_trainable", record.params_trainable, "params", f"{REC}.params_trainable"
    )
