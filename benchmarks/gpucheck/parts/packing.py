"""Packing: N trials of one budget at once on one GPU, each in its own worker process with
its own cap, against the same N one after another in one reused worker (Ray Tune with
``max_concurrent: 1`` and ``reuse_actors``). Both walls run from the first launch to the
last exit, worker start-up and imports included, as a sweep sees them.

The packed run goes first, so any warm-up (page cache, GPU clocks) favours the
sequential run: the ratio errs low. A sequential run cut short by the part's time limit
is measured on the trials it finished (said in a note).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.gpucheck import trials
from benchmarks.gpucheck.context import PartContext
from benchmarks.gpucheck.nvml import MemorySampler
from benchmarks.gpucheck.report import Target
from benchmarks.gpucheck.runner import ROOT, python_env
from benchmarks.gpucheck.worker import worker_env
from orchestrator.records import TrialRecord
from orchestrator.spec import TrialSpec
from workers.memory import cuda_context_probe

REC = "run_trial records of the packed workers"


@dataclass
class Launch:
    """Worker processes started together; what they reported."""

    wall_s: float
    pids: list[int]
    start_s: list[float]  # launch -> worker ready (interpreter, imports), per worker
    records: list[TrialRecord]
    finished: bool  # every worker exited before the deadline


def run(ctx: PartContext) -> None:
    s = ctx.sizes.packing
    specs = [
        trials.spec(
            ctx.sizes,
            ctx.device.type,
            backbone=s.backbone,
            method="lora",
            batch=s.batch,
            steps=s.steps,
            budget_mb=s.budget_mb,
            checkpointing="adaptive",
            checkpointing_args={"margin_mb": s.margin_mb},
            seed=seed,
        )
        for seed in range(s.trials)
    ]
    context_mb = _scheduler(ctx, s.budget_mb, s.trials)
    share = 1.0 / s.trials if ctx.cuda else 0.0
    scratch = ctx.out.parent / f"{ctx.name}-workers"
    scratch.mkdir(exist_ok=True)
    sampler = MemorySampler(ctx.device) if ctx.cuda else None
    deadline = ctx.deadline - 0.5 * ctx.time_left()  # at least half for the sequential run
    with sampler or contextlib.nullcontext():
        packed = _launch([[sp] for sp in specs], s.threads, share, scratch, "packed", deadline)
    _packed_figures(ctx, packed, s.trials, s.budget_mb, context_mb, sampler)
    sequential = _launch([specs], s.threads, share, scratch, "sequential", ctx.deadline)
    _throughput(ctx, packed, sequential, s.trials)


def _scheduler(ctx: PartContext, budget_mb: float, trials_wanted: int) -> float | None:
    """What the sweep's scheduler would compute (``tune_driver.gpu_share``): the GPU's
    memory, the CUDA context of a process, and how many trials of the budget fit."""
    source = "workers.memory.cuda_context_probe (the scheduler's probe: NVML - reserved)"
    if not ctx.cuda:
        for name in ("gpu_total_mb", "cuda_context_mb", "trials_per_gpu"):
            ctx.skip(f"scheduler.{name}", "skipped: no CUDA", "", source)
        return None
    total, context = cuda_context_probe()
    ctx.figure("scheduler.gpu_total_mb", total, "MiB", source)
    ctx.figure("scheduler.cuda_context_mb", context, "MiB", source)
    ctx.figure(
        "scheduler.trials_per_gpu",
        int(total // (budget_mb + context)),
        "trials",
        "floor(GPU memory / (budget + context)), as tune_driver.gpu_share",
        Target(">=", trials_wanted),
    )
    return context


def _launch(
    groups: list[list[TrialSpec]],
    threads: int,
    share: float,
    scratch: Path,
    tag: str,
    deadline: float,
) -> Launch:
    """One worker process per group of specs, all started at once; waits until every one
    exits or ``deadline`` (time.monotonic) passes, then stops the rest."""
    launched, t0 = time.time(), time.monotonic()
    outs = [scratch / f"{tag}-{i}.json" for i in range(len(groups))]
    procs = [_start(group, out, threads, share) for group, out in zip(groups, outs, strict=True)]
    finished = True
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            finished = False
            proc.kill()
            proc.wait()
    wall = time.monotonic() - t0
    states = [_read(out) for out in outs]
    return Launch(
        wall_s=wall,
        pids=[st["pid"] for st in states if st],
        start_s=[st["ready_at"] - launched for st in states if st],
        records=[TrialRecord.from_json(r) for st in states if st for r in st["records"]],
        finished=finished,
    )


def _start(specs: list[TrialSpec], out: Path, threads: int, share: float) -> subprocess.Popen:
    """A worker for ``specs`` (written beside ``out``, its output beside it in .log)."""
    specs_file = out.with_suffix(".specs")
    specs_file.write_text("".join(sp.to_json() + "\n" for sp in specs))
    command = [sys.executable, "-m", "benchmarks.gpucheck.worker", "--specs", str(specs_file),
               "--out", str(out), "--threads", str(threads), "--gpu-share", str(share)]  # fmt: skip
    with open(out.with_suffix(".log"), "wb") as log:  # the worker holds its own copy
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env={**python_env(), **worker_env(threads)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _read(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads(out.read_text())
    except (OSError, ValueError):
        return None


def _packed_figures(
    ctx: PartContext,
    packed: Launch,
    n: int,
    budget_mb: float,
    context_mb: float | None,
    sampler: MemorySampler | None,
) -> None:
    ok = [r for r in packed.records if r.status == "ok"]
    for r in packed.records:
        if r.status != "ok":
            ctx.note(f"packed trial {r.trial_id}: {r.status}: {trials.first_line(r.error)}")
    ctx.figure("packed.trials_ok", len(ok), "trials", f"{REC}: status ok", Target("==", n))
    ctx.figure(
        "packed.worker_processes",
        len(set(packed.pids)),
        "processes",
        "distinct pids the workers reported",
        Target("==", n),
    )
    cap = "cuda_allocator" if ctx.cuda else "accounted"
    kinds = ",".join(sorted({r.cap_kind for r in packed.records})) or "none"
    ctx.figure(
        "packed.cap_kind", kinds, "", f"{REC}: cap_kind (each set its own cap)", Target("==", cap)
    )
    ctx.figure(
        "packed.worker_start_s",
        statistics.median(packed.start_s or [0.0]),
        "s",
        "median launch -> worker ready (fresh interpreter, imports)",
    )
    under = Target("<=", budget_mb)
    _max_figure(ctx, "packed.max_cuda_max_allocated_mb", ok, "cuda_max_allocated_mb", under)
    _max_figure(ctx, "packed.max_cuda_max_reserved_mb", ok, "cuda_max_reserved_mb", under)
    _max_figure(ctx, "packed.max_nvml_process_mb", ok, "nvml_process_mb", None)
    if ctx.cuda:
        _max_figure(ctx, "packed.max_accounted_peak_mb", ok, "accounted_peak_mb", None)
    else:
        _max_figure(ctx, "packed.max_accounted_peak_mb", ok, "accounted_peak_mb", under)
    _sampled(ctx, sampler, packed, budget_mb, context_mb)
    shares = {r.energy_exclusive for r in ok}
    ctx.cuda_figure(
        "packed.energy_labelled_share",
        shares == {False},
        "",
        f"{REC}: energy_exclusive is false for every trial",
        Target("==", True),
    )


def _max_figure(
    ctx: PartContext, name: str, records: list[TrialRecord], field: str, target: Target | None
) -> None:
    values = [getattr(r, field) for r in records if getattr(r, field) is not None]
    source = f"max over the packed trials of record.{field}"
    if field.startswith(("cuda", "nvml")) and not ctx.cuda:
        ctx.skip(name, "skipped: no CUDA", "MiB", source)
    elif not values:
        ctx.skip(name, "no packed trial reported it", "MiB", source)
    else:
        ctx.figure(name, max(values), "MiB", source, target)


def _sampled(
    ctx: PartContext,
    sampler: MemorySampler | None,
    packed: Launch,
    budget_mb: float,
    context_mb: float | None,
) -> None:
    """NVML's view while the packed trials ran: the largest process and the whole GPU."""
    source = "NVML sampled every 0.2 s during the packed run (usedGpuMemory per worker pid)"
    if sampler is None:
        ctx.skip("packed.nvml_sampled_max_process_mb", "skipped: no CUDA", "MiB", source)
        ctx.skip("packed.nvml_sampled_device_used_mb", "skipped: no CUDA", "MiB", source)
        return
    if sampler.error:
        ctx.note(f"NVML sampling: {sampler.error}")
    ours = [mb for pid, mb in sampler.per_process_mb.items() if pid in set(packed.pids)]
    if ours:
        limit = Target("<=", round(budget_mb + (context_mb or 0.0)))
        ctx.figure(
            "packed.nvml_sampled_max_process_mb",
            max(ours),
            "MiB",
            source + "; target: budget + the probe's CUDA context",
            limit,
        )
    else:
        ctx.skip(
            "packed.nvml_sampled_max_process_mb",
            f"NVML listed none of the worker pids ({len(sampler.per_process_mb)} others; "
            "a PID namespace?)",
            "MiB",
            source,
        )
    ctx.figure(
        "packed.nvml_sampled_device_used_mb",
        sampler.device_used_mb,
        "MiB",
        "NVML nvmlDeviceGetMemoryInfo.used, max while the packed trials ran",
    )


def _throughput(ctx: PartContext, packed: Launch, sequential: Launch, n: int) -> None:
    done = [r for r in sequential.records if r.status == "ok"]
    ctx.figure(
        "sequential.trials_ok",
        len(done),
        "trials",
        "run_trial records of the one sequential worker",
        Target("==", n),
    )
    if not sequential.finished:
        ctx.note(
            f"the sequential run was stopped at the part's limit after {len(done)} of "
            f"{n} trials: its throughput is theirs"
        )
    wall = "wall clock, first launch to last worker exit (start-up included)"
    ctx.figure("packed.wall_s", packed.wall_s, "s", wall)
    ctx.figure("sequential.wall_s", sequential.wall_s, "s", wall)
    packed_rate = _per_hour(len([r for r in packed.records if r.status == "ok"]), packed.wall_s)
    sequential_rate = _per_hour(len(done), sequential.wall_s)
    ctx.figure("packed.trials_per_hour", packed_rate, "trials/h", f"ok trials / {wall}")
    ctx.figure("sequential.trials_per_hour", sequential_rate, "trials/h", f"ok trials / {wall}")
    target = ctx.gpu_target(Target(">=", 4))  # 2 CPU cores cannot show packing
    if sequential_rate:
        ctx.figure(
            "throughput_ratio",
            packed_rate / sequential_rate,
            "x",
            "packed / sequential trials per hour (walls above)",
            target,
        )
    else:
        ctx.skip("throughput_ratio", "no sequential trial finished", "x", "trials per hour")
    span_p, span_s = _span_per_trial(packed.records), _span_per_trial(sequential.records)
    if span_p and span_s:
        ctx.figure(
            "throughput_ratio_trial_time",
            span_s / span_p,
            "x",
            "from the records' started_at/ended_at: first start to last end per ok "
            "trial, sequential / packed (worker start-up excluded)",
        )


def _per_hour(count: int, seconds: float) -> float:
    return 3600.0 * count / seconds if seconds > 0 else 0.0


def _span_per_trial(records: list[TrialRecord]) -> float | None:
    ok = [r for r in records if r.status == "ok"]
    if not ok:
        return None
    start = min(dt.datetime.fromisoformat(r.started_at) for r in ok)
    end = max(dt.datetime.fromisoformat(r.ended_at) for r in ok)
    return (end - start).total_seconds() / len(ok)
