"""run_trial(spec) -> TrialRecord: one fine-tuning trial, measured, never raising.

The loop is deliberately plain (nanoGPT/airbench style): the whole dataset is a
tensor, the optimizer is AdamW or SGD with a warm-up + cosine schedule, every source
of randomness is seeded from the spec. Whatever happens inside, the caller gets a
record: an exception becomes status ``failed`` with its traceback, exceeding the
memory cap becomes ``oom`` (CUDA) or ``over_budget`` (accounted, CPU).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import itertools
import json
import logging
import math
import os
import platform
import random
import socket
import subprocess
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.records import TrialRecord
from orchestrator.spec import TrialSpec
from workers import eval_batch, memory
from workers.backbones import classifier_name, create_backbone, input_size
from workers.batch_fit import with_halving
from workers.checkpoint_plan import Infeasible
from workers.checkpointing import Checkpointer, block_modes, find_blocks
from workers.cost import forward_macs, inference_cost, weight_bytes
from workers.data import (
    Augment,
    ImageData,
    batches,
    data_options,
    load_source,
    resident_on,
    select,
)
from workers.energy import (
    EnergyConfig,
    EnergyMeasurement,
    EnergyMeter,
    MeterError,
    select_meter,
)
from workers.methods import MethodContext, apply_method, count_parameters
from workers.preflight import least_memory
from workers.profile_cache import ProfileCache, trial_key

log = logging.getLogger(__name__)

MB = memory.MB

# Hands a trial its decoded dataset (all images, before the spec's subset/validation
# options) and says where it came from: the Ray object store, a cache, a decode.
DataProvider = Callable[[], tuple[ImageData, str]]
# Receives a trial's live figures (step, loss, peak_mem_mb, energy_j so far) about
# once per PROGRESS_INTERVAL_S while it trains, and once more at the end; an epoch's
# figures also name their meters (mem_source, energy_source: strings).
ProgressSink = Callable[[dict[str, Any]], None]
PROGRESS_INTERVAL_S = 2.0


@dataclass(frozen=True)
class RunOptions:
    """How a trial runs and reports beside its spec (see ``run_trial``'s arguments)."""

    energy: EnergyConfig
    exclusive: bool | None
    progress: ProgressSink | None
    artifacts_dir: str | None
    epoch_validation: bool


def run_trial(
    spec: TrialSpec,
    *,
    num_threads: int | None = None,
    data: ImageData | DataProvider | None = None,
    energy: EnergyConfig | None = None,
    exclusive: bool | None = None,
    progress: ProgressSink | None = None,
    artifacts_dir: str | None = None,
    epoch_validation: bool = False,
) -> TrialRecord:
    """Train and evaluate ``spec``; every outcome is a record.

    ``num_threads`` caps torch's intra-op threads (a trial must not take the cores of
    the trials packed beside it). ``data`` is the decoded dataset when the caller has
    it (in memory, or a provider that fetches it from a shared store); None loads it.
    ``energy`` chooses the energy meter (default: the first available); ``exclusive``
    is the scheduler's word on whether the trial holds its device alone; ``progress``
    receives live figures while a fine-tuning trial trains. ``artifacts_dir`` (a folder
    or URI of this trial's own) receives the files the deployment phase exports (the
    spec's ``deploy``; None: none are kept). ``epoch_validation`` also sends the
    epoch's figures to ``progress`` after every epoch (``epoch``, ``step``,
    ``train_loss``, ``peak_mem_mb``, ``energy_j`` so far, ``step_time_s``, and
    ``val_accuracy`` when the dataset has a validation split: what a search's pruner,
    Ray Tune's schedulers and trackers read). None of them changes what the trial
    computes, so none is part of the spec.

    Example:
        >>> record = run_trial(TrialSpec(backbone="vit_test", dataset="digits"))
        >>> record.status, record.accuracy  # doctest: +SKIP
        ('ok', 0.93)
    """
    record = TrialRecord(spec=spec, status="failed", started_at=_now(), **_provenance())
    if num_threads:
        torch.set_num_threads(num_threads)
    device = torch.device("cpu")
    try:
        device = _device(spec)
        if device.type == "cuda":
            memory.configure_cuda_allocator()  # before this process's first allocation
        record.device = _device_name(device)
        options = RunOptions(
            energy or EnergyConfig(), exclusive, progress, artifacts_dir, epoch_validation
        )
        run = _baseline if spec.kind == "baseline" else _finetune
        run(spec, device, record, data, options)
        record.status = "ok"
    except memory.OverBudget as exc:
        record.status, record.error = "over_budget", str(exc)
        if exc.phase == "training":  # peak_mem_mb stays the training peak
            record.peak_mem_mb = exc.peak_mb
    except torch.OutOfMemoryError as exc:
        record.status, record.error = "oom", str(exc).splitlines()[0]
        if device.type == "cuda":
            _fill_cuda_peaks(record, device)
    except Exception as exc:  # noqa: BLE001 - a failure is data, not a crash of the sweep
        record.status = "failed"
        record.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        log.warning("trial %s failed: %s", spec.trial_id, exc)
    finally:  # also when a search stops the trial (a BaseException passes through)
        if device.type == "cuda":
            # leave the worker healthy for the next trial: the model (its blocks' patched
            # forwards are reference cycles) and any failed step's tensors go now
            gc.collect()
            torch.cuda.empty_cache()
        record.ended_at = _now()
    return record


# ---------------------------------------------------------------- the trial


def _finetune(
    spec: TrialSpec,
    device: torch.device,
    record: TrialRecord,
    data: ImageData | DataProvider | None,
    options: RunOptions,
) -> None:
    t_trial = time.perf_counter()
    _seed_everything(spec.seed)
    data = _data(spec, device, record, data)
    train = spec.train
    steps_per_epoch = math.ceil(len(data.train_y) / train.batch_size)
    total_steps = train.epochs * steps_per_epoch
    if train.max_steps:
        total_steps = min(total_steps, train.max_steps)

    least = least_memory(spec, data.num_classes)
    if least.total_bytes > spec.budget_mb * MB:  # refused before allocating anything
        raise memory.OverBudget(least.total_bytes / MB, spec.budget_mb, f"{least.describe()}:")
    guard = memory.RssGuard(spec.budget_mb) if device.type == "cpu" else None

    model = create_backbone(spec.backbone, num_classes=data.num_classes, **spec.backbone_args)
    size, head = input_size(model), classifier_name(model)
    adapted = apply_method(
        spec.method,
        spec.method_args,
        model,
        MethodContext(
            classifier=head,
            total_steps=total_steps,
            dataset=spec.dataset,
            steps_per_epoch=steps_per_epoch,
        ),
    )
    model = adapted.model
    ckpt = Checkpointer(spec.checkpointing, spec.checkpointing_args, model)
    blocks = find_blocks(model)
    if guard is not None:
        guard.watch(blocks)
    record.total_blocks = len(blocks)
    record.params_total = count_parameters(model)
    record.params_trainable = count_parameters(model, trainable_only=True)
    record.macs = forward_macs(model, size, torch.device("cpu"))

    model.to(device)
    cap = _apply_cap(spec, device, record)
    optimizer = _optimizer(spec, model)
    warmup = round(train.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(warmup, total_steps))
    autocast = _autocast(train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=train.precision == "fp16")
    meter = memory.ActivationMeter(model, blocks)
    feed = functools.partial(batches, size=size, mean=data.mean, std=data.std, device=device)
    # batches in the dtype the model computes in (autocast would cast them at its first
    # layer); the deployment phase computes in fp32 and gets fp32 batches
    train_feed = functools.partial(feed, dtype=_compute_dtype(train.precision))
    augment = Augment.of(data_options(spec.dataset, spec.dataset_args))
    gen = torch.Generator().manual_seed(spec.seed)
    energy_meter = select_meter(options.energy, device, exclusive=options.exclusive)
    progress = options.progress
    record.energy_source = "unavailable"  # until a window is measured

    # the saved-tensor meter runs only on the steps whose accounting is read: the first,
    # re-checks after a re-plan, and every step of an adaptive plan on CUDA (an OOM
    # there re-plans and checks the retried step)
    metered = [True]

    def forward_backward(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with meter if metered[0] else nullcontext(), autocast:
            loss = F.cross_entropy(model(xb), yb)
            objective = loss + adapted.regularizer() if adapted.regularizer else loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(objective).backward()
        return loss

    model.train()
    step, images_after_first, losses, recheck = 0, 0, [], False
    memory.sync(device)
    t_start = time.perf_counter()
    t_first = t_reported = t_start

    def peak_so_far() -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / MB
        return record.accounted_peak_mb or 0.0

    def report() -> None:
        assert progress is not None
        progress(
            {"step": step, "loss": losses[-1].item(), "peak_mem_mb": peak_so_far(),
             "energy_j": _energy_so_far(energy_meter)}
        )  # fmt: skip

    evaluate = _Evaluator(model, train_feed, autocast, device, spec, record, optimizer)
    excluded_s = excluded_j = 0.0  # per-epoch validation, not training
    try:
        epoch = 0
        while step < total_steps:
            losses, t_epoch = [], time.perf_counter()
            for xb, yb in train_feed(
                data.train_x, data.train_y, train.batch_size, generator=gen, augment=augment
            ):
                if step == 0 and ckpt.wants_profile:
                    # a dataset resident in device memory counts against the budget; on
                    # the CPU it is host memory like any dataset, outside the accounting
                    # of every strategy (else adaptive alone would pay for it)
                    on_device = device.type != "cpu" and data.train_x.device == device
                    resident = data.nbytes if on_device else 0
                    _prepare_checkpointing(ckpt, model, xb, yb, spec, autocast, resident)
                loss, replanned = _step_with_replans(
                    forward_backward, xb, yb, ckpt, model, optimizer, device
                )
                # the optimizer step is not retried: an OOM there is the trial's record
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                if adapted.on_optimizer_step is not None:
                    adapted.on_optimizer_step(step)
                losses.append(loss.detach())  # read at the end: no device sync per step
                if guard is not None:
                    guard.check()
                if step == 1 or recheck or replanned:
                    recheck = not _check_accounted(
                        model, optimizer, meter, xb, spec, record, cap, ckpt
                    )
                metered[0] = recheck or (ckpt.adaptive and device.type == "cuda")
                if step == 1:  # warm-up (first-step allocations, profiling) is not measured
                    energy_meter.begin_window()
                    t_first = time.perf_counter()
                    record.first_step_s = t_first - t_trial
                else:
                    images_after_first += len(yb)
                if progress and time.perf_counter() - t_reported >= PROGRESS_INTERVAL_S:
                    report()
                    t_reported = time.perf_counter()
                if step >= total_steps:
                    break
            epoch += 1
            if progress and options.epoch_validation:
                # the epoch's figures (a pruner's or Tune scheduler's signal, trackers'
                # curves); validating and reporting them is taken out of the training
                # time and energy (a searched trial's record stands beside a grid trial's)
                train_loss = torch.stack(losses).float().mean().item()  # syncs the device
                t_val, j_val = time.perf_counter(), _energy_so_far(energy_meter)
                figures = {
                    "epoch": epoch, "step": step, "train_loss": train_loss,
                    "peak_mem_mb": peak_so_far(), "energy_j": j_val - excluded_j,
                    "step_time_s": (t_val - t_epoch) / len(losses),
                    # the meters of those figures (a stopped trial's record names them)
                    "mem_source": record.mem_source, "energy_source": energy_meter.source,
                }  # fmt: skip
                if data.val_x is not None:
                    _begin(guard, "evaluation")
                    figures["val_accuracy"] = evaluate(data.val_x, data.val_y, data.num_classes)[0]
                    _begin(guard, "training")
                    model.train()
                    memory.sync(device)
                progress(figures)
                excluded_s += time.perf_counter() - t_val
                excluded_j += _energy_so_far(energy_meter) - j_val
        if progress and step:
            report()
        if energy_meter.window_open:
            try:
                _fill_energy(record, energy_meter.end_window(), excluded_s, excluded_j)
            except MeterError as exc:  # the device stopped answering: no energy figure
                record.energy_fallback = f"{energy_meter.source} failed: {exc}"
                log.warning("energy not measured: %s", exc)
    finally:  # also on an oom / over_budget record: what ran, and under which plan
        record.steps = step
        record.checkpointed_blocks = len(ckpt.checkpointed())
        _fill_plan(record, ckpt)
        if energy_meter.window_open:  # a failed step: stop the meter's poller
            with contextlib.suppress(MeterError):  # the step's own error is the record's
                energy_meter.end_window()
    memory.sync(device)
    t_end = time.perf_counter()
    t_end -= excluded_s
    # one-off set-up (block profiling, compilation) is excluded, for every strategy alike
    record.compile_s = ckpt.compile_s
    record.train_time_s = t_end - t_start - (ckpt.profile_s or 0.0) - record.compile_s
    record.throughput_img_s = images_after_first / (t_end - t_first) if t_end > t_first else None
    record.train_loss = torch.stack(losses).float().mean().item() if losses else None
    if device.type == "cuda":
        _fill_cuda_peaks(record, device)
        record.peak_mem_mb = record.cuda_max_allocated_mb

    try:  # the resident peaks of every phase that ran, also on an over_budget stop
        t_eval = time.perf_counter()
        _begin(guard, "evaluation")
        test = (data.test_x, data.test_y, data.num_classes)
        record.accuracy, record.top5_accuracy, record.loss = evaluate(*test)
        if data.val_x is not None:
            val = (data.val_x, data.val_y, data.num_classes)
            record.val_accuracy = evaluate(*val)[0]
        memory.sync(device)
        record.eval_time_s = time.perf_counter() - t_eval
        optimizer.state.clear()  # room for the inference copy under the cap
        _begin(guard, "inference")
        _fill_inference(record, model, size, spec, device, autocast)
        if spec.deploy:
            _begin(guard, "deployment")
        try:
            _deploy(spec, record, model, data, size, feed, device, options.artifacts_dir)
        except memory.OverBudget:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed deployment keeps the trained trial
            log.warning("deployment phase failed: %s", exc)
            record.deploy_results = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        _fill_rss(record, guard)


def _prepare_checkpointing(
    ckpt: Checkpointer,
    model: nn.Module,
    xb: torch.Tensor,
    yb: torch.Tensor,
    spec: TrialSpec,
    autocast: Any,
    resident_bytes: int,
) -> None:
    """Profile the blocks on the first batch; an adaptive strategy plans its budget
    (less what the model, its optimizer, the batch and a device-resident dataset take)."""
    static = resident_bytes + memory.predicted_static_bytes(
        model, spec.train.optimizer, xb.numel() * xb.element_size()
    )

    def forward() -> torch.Tensor:
        with autocast:
            return F.cross_entropy(model(xb), yb)

    where = _device_name(xb.device)
    cache = ProfileCache(trial_key(spec, tuple(xb.shape), str(xb.dtype), where, ckpt.adaptive))
    try:
        ckpt.prepare(
            forward, int(spec.budget_mb * MB), static, context=lambda: autocast, cache=cache
        )
    except Infeasible as exc:
        assert ckpt.profile is not None
        margin = int(ckpt.config.margin_mb * MB)
        least = static + ckpt.profile.prefix_bytes + margin + exc.min_peak_bytes
        raise memory.OverBudget(least / MB, spec.budget_mb) from None


def _step_with_replans(
    forward_backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    xb: torch.Tensor,
    yb: torch.Tensor,
    ckpt: Checkpointer,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> tuple[torch.Tensor, bool]:
    """Forward and backward of one step; out of device memory, an adaptive plan is
    tightened (a quarter below its peak) and the step retried, a bounded number of
    times, from the same RNG state and BatchNorm statistics. Returns the loss and
    whether the plan changed."""
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    stats = [b.detach().clone() for b in model.buffers()] if ckpt.adaptive else []
    replanned = False
    while True:
        try:
            return forward_backward(xb, yb), replanned
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
            peak = ckpt.plan.peak_bytes if ckpt.plan is not None else 0
            if not ckpt.replan(max(1, peak // 4)):
                raise
            replanned = True
            log.warning("out of memory: re-planned checkpointing (%d)", ckpt.replans)
            torch.random.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, device)
            with torch.no_grad():
                for buffer, value in zip(model.buffers(), stats, strict=True):
                    buffer.copy_(value)


def _check_accounted(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meter: memory.ActivationMeter,
    xb: torch.Tensor,
    spec: TrialSpec,
    record: TrialRecord,
    cap: str,
    ckpt: Checkpointer,
) -> bool:
    """Fill the accounted breakdown of the last step; True if it fits the budget.

    A CPU trial over its budget re-plans an adaptive strategy (False: check the next
    step again) or stops as over budget."""
    activations = ckpt.activation_peak(meter)
    acc = memory.account(model, optimizer, activations, xb.numel() * xb.element_size())
    record.params_mb = acc.params_bytes / MB
    record.grads_mb = acc.grads_bytes / MB
    record.optimizer_mb = acc.optimizer_bytes / MB
    record.activations_mb = acc.activations_bytes / MB
    record.batch_mb = acc.batch_bytes / MB
    record.accounted_peak_mb = acc.peak_bytes / MB
    if cap != "accounted":
        return True
    record.peak_mem_mb = record.accounted_peak_mb
    over = acc.peak_bytes - int(spec.budget_mb * MB)
    if over <= 0:
        return True
    if ckpt.replan(over):  # the next step runs the tighter plan and is checked again
        log.warning("accounted peak over budget by %.2f MiB: re-planned", over / MB)
        return False
    raise memory.OverBudget(record.accounted_peak_mb, spec.budget_mb)


def _fill_plan(record: TrialRecord, ckpt: Checkpointer) -> None:
    record.ckpt_plan = json.dumps(block_modes(ckpt.model))
    record.ckpt_replans = ckpt.replans
    record.ckpt_profile_s, record.ckpt_profile_cached = ckpt.profile_s, ckpt.profile_cached
    predicted = ckpt.predicted_activation_bytes()
    if predicted is not None and record.accounted_peak_mb is not None:
        fixed = record.accounted_peak_mb - (record.activations_mb or 0.0)
        record.ckpt_predicted_peak_mb = fixed + predicted / MB
    if ckpt.plan is not None:
        record.ckpt_recompute_ms = ckpt.plan.recompute_s * 1000.0


def _data(
    spec: TrialSpec,
    device: torch.device,
    record: TrialRecord,
    data: ImageData | DataProvider | None,
) -> ImageData:
    """The images of this trial, on the device when they fit (see ``resident_on``);
    records where they came from and how long the trial waited for them."""
    start = time.perf_counter()
    if data is None:
        data, record.data_source = load_source(spec.dataset, spec.dataset_args)
    elif isinstance(data, ImageData):
        record.data_source = "memory"
    else:
        data, record.data_source = data()
    options = data_options(spec.dataset, spec.dataset_args)
    data = select(data, options)
    if resident_on(device, options, data, spec.budget_mb):
        data = data.to(device)
        record.data_device_mb = data.nbytes / MB
    memory.sync(device)
    record.data_wait_s = time.perf_counter() - start
    record.train_images = len(data.train_y)
    record.data_skipped_images = len(data.skipped)
    return data


@dataclass
class _Evaluator:
    """Evaluates at the batch size that fits the budget (``workers.eval_batch``), chosen
    at the first call and recorded; an over-budget stop or OOM halves it and retries,
    down to the floor (below it the stop is the trial's record)."""

    model: nn.Module
    feed: Callable[..., Any]
    autocast: Any
    device: torch.device
    spec: TrialSpec
    record: TrialRecord
    optimizer: torch.optim.Optimizer

    def __call__(self, x: torch.Tensor, y: torch.Tensor, classes: int) -> tuple[float, ...]:
        record = self.record
        if record.eval_batch_size_used is None:
            self._fit(x, y)
        batch = record.eval_batch_size_used
        assert batch is not None

        def evaluate(size: int) -> tuple[float, ...]:
            record.eval_batch_size_used = size  # the batch of a stop, too
            return _evaluate(self.model, x, y, classes, self.feed, size, self.autocast)

        return with_halving(evaluate, batch, self._floor(), "evaluation", self.device)[0]

    def _floor(self) -> int:
        # a forward at the training batch size fits wherever the training step did
        train = self.spec.train
        return min(eval_batch.EVAL_BATCH_FLOOR, train.eval_batch_size, train.batch_size)

    def _fit(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.device.type == "cuda":
            resident = torch.cuda.memory_allocated(self.device)
        else:  # the data stays on the host: the guard's baseline, not the budget's
            resident = memory.account(self.model, self.optimizer, 0, 0).peak_bytes
        probe = next(iter(self.feed(x, y, min(eval_batch.EVAL_BATCH_FLOOR, len(y)))))[0]
        fit = eval_batch.fit_eval_batch(
            self.model,
            probe,
            resident_bytes=resident,
            budget_bytes=int(self.spec.budget_mb * MB),
            requested=self.spec.train.eval_batch_size,
            autocast=self.autocast,
            floor=self._floor(),
        )
        self.record.eval_batch_size_used = fit.batch_size
        self.record.eval_peak_mem_mb = fit.predicted_bytes / MB


def _begin(guard: memory.RssGuard | None, phase: str) -> None:
    """Name the phase the CPU guard measures and stops in (no guard on CUDA)."""
    if guard is not None:
        guard.begin(phase)


def _fill_rss(record: TrialRecord, guard: memory.RssGuard | None) -> None:
    if guard is None:
        return
    guard.end()
    peaks = guard.peaks_mb
    record.rss_limit_mb = guard.limit_mb
    record.train_rss_peak_mb = peaks.get("training")
    record.eval_rss_peak_mb = peaks.get("evaluation")
    record.infer_rss_peak_mb = peaks.get("inference")
    record.deploy_rss_peak_mb = peaks.get("deployment")


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    feed: Callable[..., Any],
    batch_size: int,
    autocast: Any,
) -> tuple[float, float, float]:
    model.eval()
    k = min(5, num_classes)
    correct1 = correct5 = 0
    loss_sum = 0.0
    for xb, yb in feed(x, y, batch_size):
        with autocast:
            logits = model(xb).float()
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        topk = logits.topk(k, dim=1).indices
        correct1 += (topk[:, 0] == yb).sum().item()
        correct5 += (topk == yb[:, None]).any(dim=1).sum().item()
    n = len(y)
    return correct1 / n, correct5 / n, loss_sum / n


def _baseline(
    spec: TrialSpec,
    device: torch.device,
    record: TrialRecord,
    data: ImageData | DataProvider | None,
    options: RunOptions,
) -> None:
    """A training-free baseline (``workers.baselines``) under the trial's cap and meters.

    ``train_time_s`` (and the energy window, with ``eval_time_s``) start after the model
    is loaded: feature extraction and fitting, then the test images. ``params_trainable``
    counts what is fitted on the data (a linear probe's weights), 0 for the others. On
    CPU the accounted peak is the model, the largest input batch and the features,
    embeddings or key/value caches the baseline holds.
    """
    from workers.baselines import BaselineContext, run_baseline  # not in every worker's start

    _seed_everything(spec.seed)
    data = _data(spec, device, record, data)
    _apply_cap(spec, device, record)
    meter = select_meter(options.energy, device, exclusive=options.exclusive)
    record.energy_source = "unavailable"  # until a window is measured
    ctx = BaselineContext(
        dataset=spec.dataset,
        device=device,
        batch_size=spec.train.eval_batch_size,
        precision=spec.train.precision,
        autocast=_autocast(spec.train.precision, device),
        seed=spec.seed,
        meter=meter,
        budget_bytes=int(spec.budget_mb * MB),
    )
    try:
        result = run_baseline(spec.baseline, spec.baseline_args, spec.backbone, data, ctx)
    except memory.OverBudget as exc:  # its batch does not fit: a baseline's one peak
        record.peak_mem_mb = exc.peak_mb
        raise
    finally:
        if meter.window_open:  # a failure inside: stop the meter's poller
            meter.end_window()
    if result.energy is not None:
        _fill_energy(record, result.energy)
    record.accuracy, record.top5_accuracy = result.accuracy, result.top5_accuracy
    record.val_accuracy = result.val_accuracy
    record.params_total, record.params_trainable = result.params_total, result.params_trainable
    record.macs = result.macs
    record.baseline_batch_size_used = result.batch_size_used
    record.train_time_s, record.eval_time_s = result.train_time_s, result.eval_time_s
    record.params_mb, record.batch_mb = result.params_bytes / MB, result.batch_bytes / MB
    accounted = result.params_bytes + result.batch_bytes + result.work_bytes
    record.accounted_peak_mb = accounted / MB
    record.generation_accuracy = result.generation_accuracy
    if device.type == "cuda":
        _fill_cuda_peaks(record, device)
        return
    record.peak_mem_mb = record.accounted_peak_mb
    if accounted > spec.budget_mb * MB:
        raise memory.OverBudget(record.accounted_peak_mb, spec.budget_mb)


# ---------------------------------------------------------------- pieces


def _device(spec: TrialSpec) -> torch.device:
    want = spec.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is visible")
    return torch.device(want)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _apply_cap(spec: TrialSpec, device: torch.device, record: TrialRecord) -> str:
    """Install the trial's memory cap; returns which kind applies."""
    if device.type == "cuda":
        memory.cap_cuda_memory(spec.budget_mb, device)
        record.cap_kind = record.mem_source = "cuda_allocator"
        return "cuda_allocator"
    record.cap_kind = record.mem_source = record.mem_meters = "accounted"
    return "accounted"


def _fill_cuda_peaks(record: TrialRecord, device: torch.device) -> None:
    peaks = memory.cuda_peaks(device)
    record.cuda_max_allocated_mb = peaks["cuda_max_allocated_mb"]
    record.cuda_max_reserved_mb = peaks["cuda_max_reserved_mb"]
    record.cuda_max_requested_mb = peaks["cuda_max_requested_mb"]
    record.peak_mem_mb = record.cuda_max_allocated_mb
    record.nvml_process_mb = memory.nvml_process_mb(device)
    meters = ["accounted", "cuda_allocator"] + (["nvml"] if record.nvml_process_mb else [])
    record.mem_meters = ",".join(meters)


def _energy_so_far(meter: EnergyMeter) -> float:
    """The open window's energy so far; 0 when the meter fails (its window's end says)."""
    try:
        return meter.so_far()
    except MeterError:
        return 0.0


def _fill_energy(
    record: TrialRecord, m: EnergyMeasurement, excluded_s: float = 0.0, excluded_j: float = 0.0
) -> None:
    """The window's energy, less the parts of it that were not the trial's training."""
    record.energy_j = max(m.joules - excluded_j, 0.0)
    record.energy_window_s = m.seconds - excluded_s
    record.energy_avg_w = (
        record.energy_j / record.energy_window_s if record.energy_window_s > 0 else 0.0
    )
    record.energy_source, record.energy_exclusive = m.source, m.exclusive
    record.energy_estimated, record.energy_fallback = m.estimated, m.fallback


def _fill_inference(
    record: TrialRecord,
    model: nn.Module,
    size: int,
    spec: TrialSpec,
    device: torch.device,
    autocast: Any,
) -> None:
    """Inference latency and memory of the adapted model at the trial's batch size fitted
    to its budget beside the trained model; a trial whose inference copy does not fit, or
    cannot be made, keeps its training results (the columns stay empty: a measurement
    that failed is no reason to lose what was trained)."""
    model.zero_grad(set_to_none=True)
    try:
        cost = inference_cost(
            model,
            size,
            spec.train.batch_size,
            device,
            repeats=5,
            warmup=2,
            autocast=lambda: autocast,
            budget_bytes=int(spec.budget_mb * MB),
            resident_bytes=_resident_bytes(model, device),
        )
    except Exception as exc:  # noqa: BLE001 - out of memory, an unmergeable copy, ...
        log.warning("inference cost not measured: %s", str(exc).splitlines()[0])
        return
    record.infer_latency_ms_b1, record.infer_latency_ms_batch = (
        cost.latency_ms_b1,
        cost.latency_ms_batch,
    )
    record.infer_peak_mem_mb_b1, record.infer_peak_mem_mb_batch = (
        cost.peak_mem_mb_b1,
        cost.peak_mem_mb_batch,
    )
    record.infer_mem_source, record.infer_merged = cost.mem_source, cost.merged
    record.inference_batch_size_used = cost.batch_size


def _resident_bytes(model: nn.Module, device: torch.device) -> int:
    """What a forward-only phase holds before it starts: the allocator's bytes on CUDA;
    on the CPU the trained model's weights (the data is host memory, outside the budget)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return weight_bytes(model)


def _deploy(
    spec: TrialSpec,
    record: TrialRecord,
    model: nn.Module,
    data: ImageData,
    size: int,
    feed: Callable[..., Any],
    device: torch.device,
    artifacts_dir: str | None,
) -> None:
    """The deployment phase (``workers.deploy``) when the spec asks for one: its variants
    calibrated on the first training batches of a seeded shuffle (no augmentation),
    evaluated on the test split as the trained model was (fp32), measured at the
    trial's batch size; the shipped variant's figures in the flat deploy_* columns."""
    if not spec.deploy:
        return
    from workers.deploy import DeployConfig, deploy  # and quantization: only when asked for

    config = DeployConfig(**spec.deploy)
    batch_size = spec.train.batch_size
    order = torch.Generator().manual_seed(spec.seed)
    calibration = [
        xb
        for xb, _ in itertools.islice(
            feed(data.train_x, data.train_y, batch_size, generator=order),
            config.calibration_batches,
        )
    ]

    def evaluate(variant: nn.Module) -> float:
        test = (data.test_x, data.test_y, data.num_classes)
        batch = record.eval_batch_size_used or spec.train.eval_batch_size
        return _evaluate(variant, *test, feed, batch, nullcontext())[0]

    result = deploy(
        model,
        config,
        backbone=spec.backbone,
        size=size,
        batch_size=batch_size,
        device=device,
        calibration=calibration,
        evaluate=evaluate,
        artifacts_dir=artifacts_dir,
        metadata={"trial_id": spec.trial_id, "num_classes": str(data.num_classes)},
        budget_bytes=int(spec.budget_mb * MB),
        resident_bytes=_resident_bytes(model, device),
    )
    record.deploy_batch_size_used = result.batch_size
    shipped = result.shipped
    record.deploy_variant, record.deploy_merged = shipped.variant, result.merged
    record.deploy_accuracy, record.deploy_size_mb = shipped.accuracy, shipped.size_mb
    record.deploy_latency_ms_b1 = shipped.latency_ms_b1
    record.deploy_latency_ms_batch = shipped.latency_ms_batch
    record.deploy_peak_mem_mb_b1 = shipped.peak_mem_mb_b1
    record.deploy_peak_mem_mb_batch = shipped.peak_mem_mb_batch
    record.deploy_simulated = shipped.simulated
    record.deploy_results, record.deploy_artifacts = result.to_json(), result.artifacts


def _optimizer(spec: TrialSpec, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    train = spec.train
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=0.9, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


def _warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _compute_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _autocast(precision: str, device: torch.device) -> Any:
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@functools.cache
def _provenance() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for pkg in ("vramsweep", "torch", "torchvision", "timm", "peft", "ray"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = ""
    return {
        "host": socket.gethostname(),
        "git_sha": _git_sha(),
        "versions": json.dumps(versions, sort_keys=True),
    }


def _git_sha() -> str:
    """Commit of the checkout this package runs from ('+dirty' when it has local changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("VRAMSWEEP_GIT_SHA", "unknown")
    return sha + ("+dirty" if dirty else "")
