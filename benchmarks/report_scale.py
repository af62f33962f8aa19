"""``orchestrate report`` on 10^4 and 10^5 records: wall time and peak resident memory.

Target (issue 22): 100,000 records reported in <= 20 s and <= 2 GB.

Each size is a synthetic sweep written in the record format (``RecordStore.write_many``:
group-committed parts, as a large sweep leaves them): a search-like spread of six
backbones, eight methods with their arguments, three checkpointing strategies, three
datasets, two budgets, learning rates drawn per configuration, five seeds; about 10 %
of the trials oom, over budget or failed (with a traceback), 1 % training-free
baselines; every cost column a worker fills (energy and its meter, step times, the
checkpointing plan, provenance). Writing them is not timed. Then ``orchestrate report
DIR`` runs in a child process: its wall time, CPU time and peak RSS (the child's own
``ru_maxrss``) are printed with the size of the page it wrote.

    .venv/bin/python benchmarks/report_scale.py [--sizes 10000 100000] [--backbones 6]
                                                [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from orchestrator.records import RecordStore, TrialRecord
from orchestrator.spec import TrainConfig, TrialSpec

GB = 1024**3
TARGET_S, TARGET_GB = 20.0, 2.0
BACKBONES = (
    "vit_small_patch16_224",
    "tiny_vit_5m_224",
    "vim_small",
    "mambavision_t",
    "mobilenetv2_100",
    "mobilenetv3_large_100",
)
METHODS = {  # name -> the argument values a search draws from
    "full": [{}],
    "lora": [{"r": r, "alpha": 2 * r} for r in (4, 8, 16, 32)],
    "adalora": [{"r": r} for r in (8, 16)],
    "qlora": [{"r": r} for r in (8, 16)],
    "bitfit": [{}],
    "snella": [{}],
    "lbp_wht": [{}],
    "mobiletl": [{}],
}
CHECKPOINTING = ("none", "static", "adaptive")
DATASETS = ("cifar100", "dtd", "digits")
BUDGETS = (1024.0, 2048.0)
SEEDS = 5
WIDTHS = (8, 8, 9, 6, 12, 8)  # of the printed columns
CHUNK = 5000  # records per group-committed part
TRACEBACK = (
    "Traceback (most recent call last):\n"
    + '  File "workers/trial.py", line 300, in run_trial\n    loss = step(xb, yb)\n' * 6
    + "RuntimeError: CUDA error: an illegal memory access was encountered"
)


def synthesise(n: int, folder: Path, seed: int = 0, backbones: int = len(BACKBONES)) -> None:
    """``n`` records of a search-like sweep under ``folder/records``; past the six named
    backbones, more (timm-like names) make more configurations."""
    rng = np.random.default_rng(seed)
    names = [*BACKBONES, *(f"timm_model_{i:03d}" for i in range(backbones - len(BACKBONES)))]
    store = RecordStore(folder, compact_every=0)
    batch: list[TrialRecord] = []
    for i in range(n):
        batch.append(_record(i, rng, names))
        if len(batch) == CHUNK:
            store.write_many(batch)
            batch = []
    if batch:
        store.write_many(batch)


def _record(i: int, rng: np.random.Generator, backbones: list[str]) -> TrialRecord:
    config, seed = divmod(i, SEEDS)
    crng = np.random.default_rng(config)  # the seeds of a configuration share it
    backbone = backbones[crng.integers(len(backbones))]
    dataset = DATASETS[crng.integers(len(DATASETS))]
    budget = BUDGETS[crng.integers(len(BUDGETS))]
    if crng.random() < 0.01:
        spec = TrialSpec(
            kind="baseline",
            backbone=backbone,
            method="",
            dataset=dataset,
            budget_mb=budget,
            seed=seed,
            baseline="dinov2_knn",
            baseline_args={"k": int(crng.integers(5, 10_000))},  # ids stay distinct
        )
        return TrialRecord(spec=spec, status="ok", accuracy=float(rng.uniform(0.6, 0.95)))
    method = list(METHODS)[crng.integers(len(METHODS))]
    args = METHODS[method][crng.integers(len(METHODS[method]))]
    ckpt = CHECKPOINTING[crng.integers(len(CHECKPOINTING))]
    train = TrainConfig(
        epochs=int(crng.integers(1, 10)),
        batch_size=int(crng.choice([32, 64, 128])),
        lr=float(10 ** crng.uniform(-4.5, -2)),
    )
    spec = TrialSpec(
        backbone=backbone,
        method=method,
        method_args=args,
        checkpointing=ckpt,
        dataset=dataset,
        budget_mb=budget,
        train=train,
        seed=seed,
    )
    roll = rng.random()
    if roll < 0.05:
        return TrialRecord(spec=spec, status="over_budget", error="accounted peak over budget")
    if roll < 0.08:
        return TrialRecord(spec=spec, status="oom", error="CUDA out of memory. Tried to allocate")
    if roll < 0.10:
        return TrialRecord(spec=spec, status="failed", error=TRACEBACK)
    mem = float(crng.uniform(200, budget)) * (0.6 if ckpt != "none" else 1.0)
    step_s = float(crng.uniform(0.05, 0.5)) * (1.25 if ckpt == "static" else 1.0)
    steps = int(train.epochs * 50000 / train.batch_size)
    energy = steps * step_s * float(rng.uniform(180, 260))
    return TrialRecord(
        spec=spec,
        status="ok",
        accuracy=float(np.clip(crng.uniform(0.5, 0.95) + rng.normal(0, 0.01), 0, 1)),
        top5_accuracy=float(rng.uniform(0.9, 1.0)),
        loss=float(rng.uniform(0.2, 2)),
        train_loss=float(rng.uniform(0.1, 1.5)),
        train_time_s=steps * step_s,
        eval_time_s=float(rng.uniform(2, 20)),
        throughput_img_s=train.batch_size / step_s,
        first_step_s=float(rng.uniform(1, 10)),
        steps=steps,
        peak_mem_mb=mem + float(rng.normal(0, 5)),
        mem_source="cuda_allocator",
        cap_kind="cuda_allocator",
        energy_j=energy,
        energy_source="nvml_energy",
        energy_window_s=steps * step_s,
        energy_avg_w=energy / (steps * step_s),
        energy_exclusive=True,
        energy_estimated=False,
        params_total=int(crng.integers(2e6, 3e7)),
        params_trainable=int(crng.integers(1e4, 3e7)),
        macs=int(crng.integers(3e8, 5e9)),
        infer_latency_ms_b1=float(rng.uniform(2, 20)),
        infer_peak_mem_mb_b1=float(rng.uniform(50, 300)),
        total_blocks=12,
        checkpointed_blocks=0 if ckpt == "none" else int(crng.integers(1, 12)),
        ckpt_plan=json.dumps(["save"] * 6 + ["recompute"] * 6) if ckpt == "adaptive" else "",
        ckpt_profile_s=float(rng.uniform(0, 10)) if ckpt == "adaptive" else None,
        device="NVIDIA H100 80GB HBM3",
        host=f"node{config % 16:02d}",
        git_sha="0123456789abcdef0123456789abcdef01234567",
        versions=json.dumps({"python": "3.11.7", "torch": "2.6.0", "timm": "1.0.15"}),
        started_at="2026-12-06T10:00:00Z",
        ended_at="2026-12-06T10:05:00Z",
    )


def report(folder: Path) -> tuple[float, float, float, int]:
    """(wall s, CPU s, peak RSS GiB, exit status) of ``orchestrate report folder`` in a
    child (CPU time too: on a shared machine the wall time also counts others' work)."""
    orchestrate = str(Path(sys.executable).with_name("orchestrate"))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [orchestrate, "report", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        print(proc.stderr.read().decode() if proc.stderr else "", file=sys.stderr)
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss * 1024 / GB, proc.returncode  # ru_maxrss: KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--keep", help="write the sweeps under this folder and keep them")
    parser.add_argument(
        "--backbones",
        type=int,
        default=len(BACKBONES),
        help="backbone names in the sweep (400: about 10^4 configurations at 10^5 records)",
    )
    args = parser.parse_args()
    base = Path(args.keep or tempfile.mkdtemp(prefix="vramsweep-report-scale-"))
    print(f"orchestrate report, target at 100,000 records: <= {TARGET_S:g} s, <= {TARGET_GB:g} GB")
    print(f"{args.backbones} backbones x 8 methods x 3 strategies x 3 datasets x 2 budgets")
    head = ("records", "write s", "report s", "CPU s", "peak RSS GB", "html MB")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, WIDTHS, strict=True)) + "  status")
    try:
        for n in args.sizes:
            folder = base / f"sweep{n}-{args.backbones}"
            if not (folder / "records").is_dir():
                t0 = time.perf_counter()
                synthesise(n, folder, backbones=args.backbones)
                wrote = f"{time.perf_counter() - t0:8.1f}"
            else:
                wrote = f"{'kept':>8}"
            wall, cpu, rss, status = report(folder)
            html = (folder / "report.html").stat().st_size / 1e6 if status == 0 else float("nan")
            print(f"{n:>8} {wrote} {wall:9.1f} {cpu:6.1f} {rss:12.2f} {html:8.1f}  exit {status}")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
