"""Memory of every phase of a trial, before and after budget-driven batch sizes (CPU).

For each backbone at its native resolution on digits, one fine-tuning trial with the
deployment phase (float variant) runs twice, each in a fresh process:

- ``before``: fixed batch sizes, as the project ran them before issue 23: evaluation at
  ``--eval-batch-size``, the inference cost and the deployment phase at ``--batch-size``
  (the fits of ``workers.batch_fit`` return the requested size) and no resident-memory
  stop (the guard's limit lifted), so that each phase's real peak is seen;
- ``after``: the code as it is: every forward-only phase's batch fitted to the budget,
  the guard stopping a trial past budget + margin.

Printed per run: the accounted training peak (``peak_mem_mb`` on the CPU), each phase's
resident peak above the worker's idle baseline (``*_rss_peak_mb``: RSS after data
loading; samples and the kernel's high-water mark reset per phase) with the batch it
ran at, and whether every phase stayed within budget + margin (``rss_limit_mb``).

    .venv/bin/python benchmarks/memory_phases.py [--backbones a,b] [--budget-mb 8192]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.records import TrialRecord  # noqa: E402
from orchestrator.spec import TrainConfig, TrialSpec  # noqa: E402
from workers.rss_limit import rss_limit_mb  # noqa: E402

MODES = ("before", "after")
PHASES = ("train", "eval", "infer", "deploy")
UNLIMITED_MB = 1e12  # the guard's limit in a ``before`` run (a finite number: records are JSON)


def _spec(args: argparse.Namespace, backbone: str) -> TrialSpec:
    train = TrainConfig(
        epochs=1,
        batch_size=args.batch_size,
        max_steps=args.steps,
        eval_batch_size=args.eval_batch_size,
        device="cpu",
    )
    return TrialSpec(
        backbone=backbone,
        method=args.method,
        dataset="digits",
        dataset_args={},  # image_size 0: the backbone's native resolution
        budget_mb=args.budget_mb,
        train=train,
        deploy={"variants": ["float"]} if args.deploy else {},
    )


def _fixed_batches() -> None:
    """The ``before`` run: every fit returns the requested batch; the guard never stops."""
    from workers import batch_fit, cost, deploy, eval_batch, memory
    from workers.baselines import base

    def requested(**kw: object) -> batch_fit.FittedBatch:
        return batch_fit.FittedBatch(int(kw["requested"]), 0)  # type: ignore[call-overload]

    for module in (eval_batch, cost, deploy, base):
        module.fit_batch = requested  # type: ignore[attr-defined]
    memory.rss_limit_mb = lambda budget_mb: UNLIMITED_MB  # type: ignore[assignment]


def run_one(spec_json: str, mode: str, threads: int) -> None:
    """In the child process: one trial, its record printed as one JSON line."""
    if mode == "before":
        _fixed_batches()
    from workers.trial import run_trial

    record = run_trial(TrialSpec.from_json(spec_json), num_threads=threads)
    print("RECORD " + record.to_json(), flush=True)


def _child(spec: TrialSpec, mode: str, threads: int) -> tuple[TrialRecord | None, float]:
    start = time.perf_counter()
    cmd = [sys.executable, __file__, "--one", spec.to_json(), "--mode", mode]
    out = subprocess.run(
        [*cmd, "--threads", str(threads)], capture_output=True, text=True, cwd=REPO, check=False
    )
    seconds = time.perf_counter() - start
    for line in out.stdout.splitlines():
        if line.startswith("RECORD "):
            return TrialRecord.from_json(line[len("RECORD ") :]), seconds
    print(f"  {spec.backbone} {mode}: no record (exit {out.returncode})\n{out.stderr[-2000:]}")
    return None, seconds


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _line(backbone: str, mode: str, r: TrialRecord, limit: float, seconds: float) -> str:
    batches = {
        "train": r.spec.train.batch_size,
        "eval": r.eval_batch_size_used,
        "infer": r.inference_batch_size_used,
        "deploy": r.deploy_batch_size_used,
    }
    peaks = {p: getattr(r, f"{p}_rss_peak_mb") for p in PHASES}
    cells = [f"{_mb(peaks[p])} ({batches[p] or '-'})" for p in PHASES]
    within = all(v is None or v <= limit for v in peaks.values())
    status = r.status if r.status == "ok" else f"{r.status}: {(r.error or '').splitlines()[0]}"
    return (
        f"{backbone:<22} {mode:<6} {_mb(r.peak_mem_mb):>9} {_mb(r.eval_peak_mem_mb):>9} "
        + " ".join(f"{c:>15}" for c in cells)
        + f" {'yes' if within else 'NO':>6} {seconds:>6.0f}  {status}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", help="comma-separated (default: every registered real one)")
    parser.add_argument("--budget-mb", type=float, default=8192.0)
    parser.add_argument("--method", default="full")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="training steps per trial")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    parser.add_argument("--no-deploy", dest="deploy", action="store_false")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: a spec's JSON
    parser.add_argument("--mode", default="after", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.mode, args.threads)
        return 0
    from workers.backbones import BACKBONES

    names = args.backbones.split(",") if args.backbones else [
        n for n in BACKBONES.names() if not n.endswith("_test")
    ]  # fmt: skip
    limit = rss_limit_mb(args.budget_mb)
    print(
        f"digits at each backbone's native resolution, CPU, {args.threads} thread(s); method "
        f"{args.method}, batch {args.batch_size}, evaluation batch {args.eval_batch_size}, "
        f"{args.steps} steps, deployment {'float' if args.deploy else 'off'}; budget "
        f"{args.budget_mb:g} MiB, resident limit (budget + margin) {limit:g} MiB"
    )
    print(
        "accounted: training peak (peak_mem_mb), MiB; predicted: evaluation peak the batch was "
        "fitted by (eval_peak_mem_mb), MiB; train/eval/infer/deploy: resident peak above the "
        "idle baseline, MiB (batch); within: every phase <= the limit; s: wall time"
    )
    header = f"{'backbone':<22} {'run':<6} {'accounted':>9} {'predicted':>9} " + " ".join(
        f"{p:>15}" for p in PHASES
    )
    print(header + f" {'within':>6} {'s':>6}  status")
    failed = False
    for name in names:
        spec = _spec(args, name)
        for mode in args.modes.split(","):
            record, seconds = _child(spec, mode, args.threads)
            if record is None:
                failed = True
                continue
            print(_line(name, mode, record, limit, seconds), flush=True)
            failed |= mode == "after" and record.status not in ("ok", "over_budget")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
