"""Throughput and model FLOPs utilisation of ViT-S full fine-tuning in bf16.

Two measurements: ``run_trial``'s own loop (batches made and augmented on the device,
its record's ``throughput_img_s``), and a bare forward + backward + fused AdamW loop on
one batch (the model's ceiling). MFU = images/s x training FLOPs per image / the GPU's
peak dense bf16 rate, with training FLOPs = 3 x 2 x the forward MACs of our count
(``workers.cost.forward_macs``: backward ~ twice the forward). The peak rate comes from
NVIDIA's datasheets by device name, else from SMs x top SM clock x FLOPs per clock
per SM of the architecture; the figure's source says which.
"""

from __future__ import annotations

import torch

from benchmarks.gpucheck import steps, trials
from benchmarks.gpucheck.context import PartContext
from benchmarks.gpucheck.report import NO_CUDA, Target
from orchestrator.records import TrialRecord
from workers.cost import forward_macs
from workers.trial import run_trial

# Dense bf16 tensor-core peaks, FLOP/s, from NVIDIA's datasheets: (name part, rate), the
# more specific names first.
DATASHEET = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("GH200", 989.4e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)
# Dense bf16 FLOPs per clock per SM by compute capability (datasheet peak / SMs / clock)
FLOPS_PER_CLOCK_SM = {(8, 0): 2048, (9, 0): 4096, (10, 0): 8192}
MFU_TARGET = 0.35


def run(ctx: PartContext) -> None:
    s = ctx.sizes.mfu
    peak, peak_source = peak_flops(ctx)
    if peak:
        ctx.figure("peak_bf16_tflops", peak / 1e12, "TFLOP/s", peak_source)
    else:
        ctx.skip("peak_bf16_tflops", peak_source, "TFLOP/s", "device peak table")
    record = _trial(ctx)
    step = steps.training_step(
        s.backbone, s.batch, ctx.device, ctx.sizes.precision, ctx.cuda, ctx.sizes.img_size
    )
    macs = forward_macs(step.model, step.x.shape[-1], ctx.device)
    ctx.figure("macs_per_image", macs, "MAC", "workers.cost.forward_macs (torch FlopCounterMode)")
    train_flops = 6 * macs
    ms = steps.median_ms(steps.seconds(step, ctx.device, s.loop_steps, warmup=3))
    loop_rate = s.batch / (ms / 1000.0)
    ctx.figure(
        "loop.step_ms",
        ms,
        "ms",
        f"bare loop, batch {s.batch}: median of {s.loop_steps} synchronised steps after 3 warm-up",
    )
    ctx.figure("loop.images_per_s", loop_rate, "img/s", "batch / median step time")
    ctx.figure(
        "trial.images_per_s",
        record.throughput_img_s,
        "img/s",
        "run_trial record.throughput_img_s (first step excluded)",
    )
    for name, rate in (("loop", loop_rate), ("trial", record.throughput_img_s)):
        source = f"{name}.images_per_s x 6 x macs_per_image / peak_bf16_tflops"
        if not ctx.cuda:
            ctx.skip(f"{name}.mfu", NO_CUDA, "of peak", source)
        elif not peak or not rate:
            ctx.skip(f"{name}.mfu", "no peak rate or no throughput", "of peak", source)
        else:
            ctx.figure(
                f"{name}.mfu",
                rate * train_flops / peak,
                "of peak",
                source,
                Target(">=", MFU_TARGET),
            )


def _trial(ctx: PartContext) -> TrialRecord:
    s = ctx.sizes.mfu
    budget = 1 << 20  # no cap worth the name: this measures speed, not memory
    if ctx.cuda:
        budget = 0.9 * torch.cuda.get_device_properties(ctx.device).total_memory / 2**20
    spec = trials.spec(
        ctx.sizes,
        ctx.device.type,
        backbone=s.backbone,
        method="full",
        batch=s.batch,
        steps=s.trial_steps,
        budget_mb=round(budget),
    )
    record = run_trial(spec, num_threads=ctx.sizes.threads, data=trials.dataset(ctx.sizes))
    ctx.figure("trial.status", record.status, "", "run_trial record.status", Target("==", "ok"))
    if record.status != "ok":
        ctx.note(f"trial: {record.status}: {trials.first_line(record.error)}")
    return record


def peak_flops(ctx: PartContext) -> tuple[float | None, str]:
    """The device's dense bf16 peak, FLOP/s, and where it comes from."""
    if not ctx.cuda:
        return None, NO_CUDA
    props = torch.cuda.get_device_properties(ctx.device)
    for part, rate in DATASHEET:
        if part in props.name:
            return rate, f"NVIDIA datasheet, dense bf16, '{part}' in '{props.name}'"
    per_clock = FLOPS_PER_CLOCK_SM.get((props.major, props.minor))
    from benchmarks.gpucheck.nvml import max_sm_clock_mhz

    clock = max_sm_clock_mhz(ctx.device)
    if per_clock is None or clock is None:
        return None, f"no peak known for {props.name} (capability {props.major}.{props.minor})"
    rate = props.multi_processor_count * clock * 1e6 * per_clock
    return rate, (
        f"computed: {props.multi_processor_count} SMs x {clock:g} MHz (NVML max SM "
        f"clock) x {per_clock} FLOP/clock/SM (capability {props.major}.{props.minor})"
    )
