"""Adaptive checkpointing on the real models: step time and memory of each strategy.

Full fine-tuning (AdamW, the check's precision) of ViT-S/16 and Vim-S on one batch. The
blocks are profiled once; then, per strategy, the blocks' modes are set and the step is
timed round-robin (every strategy once per round, so drift hits all alike):

- ``none``: every activation kept;
- ``static``: every block recomputed;
- ``adaptive``: the exact planner at ``fraction`` of the unconstrained activation bytes;
- ``selective``: PyTorch's selective activation checkpointing on every block
  (``torch.utils.checkpoint.create_selective_checkpoint_contexts`` with our policy:
  matmul, convolution and attention outputs kept, the rest recomputed);
- ``compiled``: ``torch.compile`` with its activation memory budget at ``fraction``
  (PyTorch's own min-cut policy): CUDA and the ViT only, when time is left.

Memory per strategy: the accounted activation peak (autograd's saved tensors, the
re-materialisation of a recomputed block included, as the trial accounts it) and, on
CUDA, the allocator's peak during the step above what was allocated before it.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.gpucheck import steps, trials
from benchmarks.gpucheck.context import PartContext
from benchmarks.gpucheck.report import NO_CUDA, Target
from workers.checkpoint_plan import Infeasible
from workers.checkpointing import (
    Checkpointer,
    Profile,
    block_modes,
    count_modes,
    find_blocks,
    profile_blocks,
    set_mode,
)
from workers.memory import MB, ActivationMeter

STRATEGIES = ("none", "static", "adaptive", "selective")
COMPILE_NEEDS_S = 60.0  # time left for torch.compile's first compilation, forward + backward
TIME = "median wall time of forward + backward + AdamW step (synchronised, warm-up excluded)"
PEAK = "torch.cuda.max_memory_allocated during one step minus allocated before it"
ACT = "accounted: autograd saved tensors (ActivationMeter) + recomputed block's re-materialisation"


def run(ctx: PartContext) -> None:
    s = ctx.sizes.checkpointing
    none_ms = [
        None
        if ctx.out_of_time(f"{model[0]}.none.step_ms", "ms")
        else ctx.attempt(model[0], lambda model=model: _model(ctx, *model))
        for model in s.models
    ]
    steps.free_cuda()
    label, backbone, batch, _ = s.models[0]
    if s.compile_budget and ctx.cuda and none_ms[0]:
        _compiled(ctx, label, backbone, batch, none_ms[0])
    else:
        reason = NO_CUDA if not ctx.cuda else "not asked for"
        ctx.skip(f"{label}.compiled.step_ms", reason, "ms", "torch.compile memory budget")


def _model(ctx: PartContext, label: str, backbone: str, batch: int, img_size: int) -> float:
    """Every strategy's figures on ``backbone``; the step time of ``none``, ms."""
    s = ctx.sizes.checkpointing
    precision = ctx.sizes.precision
    step = steps.training_step(backbone, batch, ctx.device, precision, ctx.cuda, img_size)
    model = step.model
    profile = profile_blocks(model, step.loss, context=step.context)
    unconstrained = profile.unconstrained_bytes
    ctx.figure(
        f"{label}.unconstrained_activations_mb",
        unconstrained / MB,
        "MiB",
        "workers.checkpointing.profile_blocks: activation bytes with every block kept",
    )
    # a Checkpointer that only reads the profile: the re-materialisation of recomputed
    # blocks counts in the accounted peak, as in a trial
    accountant = Checkpointer("none", {}, model)
    accountant.profile = profile
    modes = _modes(ctx, label, model, profile, int(s.fraction * unconstrained))
    steps.seconds(step, ctx.device, 0, warmup=s.warmup)  # AdamW's state exists from here
    memory = {name: _memory(model, step, accountant, plan) for name, plan in modes.items()}
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(s.rounds):
        for name, plan in modes.items():
            _apply(model, plan)
            times[name] += steps.seconds(step, ctx.device, s.steps, warmup=1)
    ms = {name: steps.median_ms(t) for name, t in times.items()}
    for name in modes:
        act, peak = memory[name]
        ctx.figure(f"{label}.{name}.step_ms", ms[name], "ms", TIME)
        ctx.figure(f"{label}.{name}.activations_mb", act, "MiB", ACT)
        ctx.cuda_figure(f"{label}.{name}.step_peak_mb", peak, "MiB", PEAK)
    _ratios(ctx, label, ms, memory)
    del step, model
    steps.free_cuda()
    return ms["none"]


def _modes(
    ctx: PartContext, label: str, model: nn.Module, profile: Profile, budget: int
) -> dict[str, dict[str, str]]:
    """Per strategy, the mode of every block."""
    names = [n for n, _ in find_blocks(model)]
    applies = {b.name: b.selective_bytes is not None for b in profile.blocks}
    modes = {
        "none": dict.fromkeys(names, "save"),
        "static": dict.fromkeys(names, "recompute"),
        # where it applies: a block that changes a kept output in place keeps everything
        "selective": {n: "selective" if applies.get(n) else "save" for n in names},
    }
    ckpt = Checkpointer("adaptive", {}, model)
    try:
        ckpt.use(profile, budget - profile.prefix_bytes)
        modes["adaptive"] = block_modes(model)
        ctx.figure(
            f"{label}.adaptive.plan",
            count_modes(modes["adaptive"].values()),
            trials.PLAN_LABEL,
            f"workers.checkpoint_plan at {budget / MB:.1f} MiB of activations",
        )
    except Infeasible as exc:
        ctx.skip(f"{label}.adaptive.plan", f"infeasible at this budget: {exc}", "", "planner")
    _apply(model, modes["none"])
    return {name: modes[name] for name in STRATEGIES if name in modes}


def _apply(model: nn.Module, modes: dict[str, str]) -> None:
    for name, block in find_blocks(model):
        set_mode(block, modes[name])


def _memory(
    model: nn.Module, step: steps.Step, accountant: Checkpointer, modes: dict[str, str]
) -> tuple[float, float | None]:
    """(accounted activation peak, allocator step peak) of one step in ``modes``, MiB."""
    _apply(model, modes)
    meter = ActivationMeter(model, find_blocks(model))
    with meter:
        loss = step.loss()
    loss.backward()
    model.zero_grad(set_to_none=True)
    meter.remove()
    activations = accountant.activation_peak(meter) / MB
    return activations, steps.step_peak_mb(step, step.device)


def _ratios(
    ctx: PartContext, label: str, ms: dict[str, float], memory: dict[str, tuple[float, float]]
) -> None:
    base = ms["none"]
    if "adaptive" in ms:
        ctx.figure(
            f"{label}.adaptive_vs_none",
            ms["adaptive"] / base,
            "x",
            "step time ratio, same run",
            ctx.gpu_target(Target("<=", 1.10)),
        )
        ctx.figure(
            f"{label}.adaptive_vs_static",
            ms["adaptive"] / ms["static"],
            "x",
            "step time ratio, same run",
            ctx.gpu_target(Target("<", 1.0)),
        )
        ctx.figure(
            f"{label}.adaptive_activation_share",
            memory["adaptive"][0] / memory["none"][0],
            "of none",
            "accounted activations, adaptive / none",
            Target("<=", ctx.sizes.checkpointing.fraction),
        )
    ctx.figure(f"{label}.static_vs_none", ms["static"] / base, "x", "step time ratio, same run")
    ctx.figure(
        f"{label}.selective_vs_none", ms["selective"] / base, "x", "step time ratio, same run"
    )


def _compiled(ctx: PartContext, label: str, backbone: str, batch: int, none_ms: float) -> None:
    """torch.compile's own activation memory budget, if the part has the time left."""
    source = "torch.compile with torch._functorch.config.activation_memory_budget"
    if ctx.time_left() < COMPILE_NEEDS_S:
        ctx.skip(
            f"{label}.compiled.step_ms",
            f"skipped: under {COMPILE_NEEDS_S:g} s left in the part's limit",
            "ms",
            source,
        )
        return
    import torch._functorch.config as functorch_config

    fraction = ctx.sizes.checkpointing.fraction
    step = steps.training_step(backbone, batch, ctx.device, ctx.sizes.precision, fused=True)
    step.model = torch.compile(step.model)
    with functorch_config.patch(activation_memory_budget=fraction):
        compile_s = sum(steps.seconds(step, ctx.device, 1))  # the first call compiles
        ms = steps.median_ms(steps.seconds(step, ctx.device, ctx.sizes.checkpointing.steps, 1))
        peak = steps.step_peak_mb(step, ctx.device)
    ctx.figure(f"{label}.compiled.compile_s", compile_s, "s", "first call (compilation)")
    ctx.figure(f"{label}.compiled.step_ms", ms, "ms", f"{source}={fraction:g}; {TIME}")
    ctx.figure(f"{label}.compiled.step_peak_mb", peak, "MiB", f"{source}={fraction:g}; {PEAK}")
    ctx.figure(
        f"{label}.compiled_vs_none",
        ms / none_ms,
        "x",
        "step time ratio to the eager none above, same process",
    )
