"""The GPU acceptance check: every CUDA path of vramsweep measured on one GPU in under 8 minutes.

Runs the parts of ``benchmarks/gpucheck/parts`` (hard cap, packing, checkpointing,
energy, MFU, methods, Mamba), each in its own process with a time limit, within one
time budget for the whole run; a part that fails, crashes or times out is recorded as
such and the run goes on. Writes ``OUT/gpu_check.json`` (schema: benchmarks/gpucheck/
report.py) and ``OUT/gpu_check.md`` (every figure with its source). Needs only torch,
timm, peft, torchvision, transformers and nvidia-ml-py (no Ray, Optuna or open_clip);
bitsandbytes only for QLoRA. How to run it on the device tool: docs/gpu_check.md.

    python3 -m benchmarks.gpu_check --out OUT            # on a GPU machine
    python3 -m benchmarks.gpu_check --cpu --out OUT      # the same code, tiny, on a CPU
    python3 -m benchmarks.gpu_check --parts cap,energy --dry-run

Exit code: 0 when every part ran to its end (targets may be missed: read the figures),
1 when a part failed, crashed, timed out or was skipped, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root on the path, not benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.gpucheck import report, runner  # noqa: E402
from benchmarks.gpucheck.parts import Part, select  # noqa: E402

# The whole run must fit twice in the device tool's 15 minutes, machine start included.
DEFAULT_BUDGET_S = 420.0
TINY_BUDGET_S = 1200.0  # a --cpu run has no device time to save: the parts' limits bound it
MIN_PART_S = 15.0  # a part gets no start with less than this left of the budget
DEFAULT_OUT = runner.ROOT / "results" / "gpu_check"


def main(argv: list[str] | None = None) -> int:
    args = _arguments(sys.argv[1:] if argv is None else argv)
    try:
        parts = select(args.parts)
    except ValueError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    plan = _plan(parts, args.tiny, args.budget_s)
    _print_plan(plan, args)
    if args.dry_run:
        for part in parts:
            scratch = Path("SCRATCH") / f"{part.name}.json"
            command = runner.part_command(
                part, scratch, args.device, args.tiny, part.limit(args.tiny)
            )
            print("  " + shlex.join(command))
        return 0
    doc = run_check(parts, plan, args)
    paths = write(doc, args.out)
    return _conclude(doc, paths)


def _arguments(argv: list[str]) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    args.command = shlex.join(["python3", "-m", "benchmarks.gpu_check", *argv])
    if args.cpu:
        args.device, args.tiny = "cpu", True
    if args.budget_s is None:
        args.budget_s = TINY_BUDGET_S if args.tiny else DEFAULT_BUDGET_S
    return args


def _conclude(doc: dict[str, Any], paths: tuple[Path, Path]) -> int:
    """Print the parts' table and every missed target; the exit code."""
    print(report.markdown(doc).split("\n## ")[0])
    for name, part in doc["parts"].items():
        for f in (f for f in part["figures"] if f["met"] is False):
            print(f"target missed: {name} {f['name']} = {f['value']} {f['unit']} ({f['target']})")
    print(f"written: {paths[0]} and {paths[1]}")
    problems = report.validate(doc)
    for problem in problems:
        print(f"schema problem: {problem}", file=sys.stderr)
    all_ok = all(p["status"] == "ok" for p in doc["parts"].values())
    return 0 if all_ok and not problems else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", help="comma-separated parts to run (default: all)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny backbones and sizes")
    parser.add_argument("--cpu", action="store_true", help="same as --device cpu --tiny")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the results")
    parser.add_argument(
        "--budget-s",
        type=float,
        help=f"time budget of the whole run, s (default {DEFAULT_BUDGET_S:g}; "
        f"{TINY_BUDGET_S:g} with --tiny)",
    )
    return parser


def _plan(parts: list[Part], tiny: bool, budget_s: float) -> list[dict[str, Any]]:
    return [
        {
            "part": p.name,
            "title": p.title,
            "estimate_s": p.estimate(tiny),
            "limit_s": min(p.limit(tiny), budget_s),
        }
        for p in parts
    ]


def _print_plan(plan: list[dict[str, Any]], args: argparse.Namespace) -> None:
    mode = "CPU, tiny backbones" if args.tiny else f"{args.device}, real sizes"
    total = sum(p["estimate_s"] for p in plan)
    print(
        f"vramsweep GPU check ({mode}): {len(plan)} parts, estimated {_mmss(total)} "
        f"(a guess until measured), budget {_mmss(args.budget_s)}"
    )
    for i, p in enumerate(plan, 1):
        print(
            f"  {i}. {p['part']:<14} ~{p['estimate_s']:>4.0f} s (limit {p['limit_s']:>3.0f} s)"
            f"  {p['title']}"
        )


def run_check(parts: list[Part], plan: list[dict[str, Any]], args: argparse.Namespace) -> dict:
    """Run ``parts`` one after another inside the time budget; the report document."""
    started, t0 = _now(), time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    stop_reason = ""
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        for i, (part, planned) in enumerate(zip(parts, plan, strict=True), 1):
            left = args.budget_s - (time.monotonic() - t0)
            if stop_reason or left < MIN_PART_S:
                reason = stop_reason or f"the run's time budget ({args.budget_s:g} s) is spent"
                result = runner.skipped(reason)
            else:
                limit = min(planned["limit_s"], left)
                result = runner.run_part(part, Path(scratch), args.device, args.tiny, limit)
                if result["environment"].get("no_cuda"):
                    stop_reason = "no CUDA device (see the first part); use --cpu on a CPU"
            results[part.name] = result
            _print_result(i, len(parts), part.name, result)
    return _document(args, plan, results, started, time.monotonic() - t0)


def _document(
    args: argparse.Namespace,
    plan: list[dict[str, Any]],
    results: dict[str, dict[str, Any]],
    started: str,
    wall_s: float,
) -> dict[str, Any]:
    return {
        "schema": report.SCHEMA,
        "device": args.device,
        "tiny": args.tiny,
        "started_at": started,
        "ended_at": _now(),
        "wall_s": round(wall_s, 2),
        "budget_s": args.budget_s,
        "command": args.command,
        "provenance": _provenance(),
        "environment": next((r["environment"] for r in results.values() if r["environment"]), {}),
        "plan": plan,
        "parts": results,
        "summary": report.summarise(results),
    }


def _print_result(i: int, n: int, name: str, result: dict[str, Any]) -> None:
    figures = result["figures"]
    met = sum(f["met"] is True for f in figures)
    missed = sum(f["met"] is False for f in figures)
    line = (
        f"[{i}/{n}] {name}: {result['status']} in {result['wall_s']:.1f} s, "
        f"{len(figures)} figures, targets met {met}, missed {missed}"
    )
    if result["status"] != "ok":
        line += f" ({result['reason'].strip().splitlines()[-1] if result['reason'] else ''})"
    print(line, flush=True)


def write(doc: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``gpu_check.json`` and ``gpu_check.md`` under ``out`` (each written, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "gpu_check.json", out / "gpu_check.md")
    for path, text in zip(paths, (json.dumps(doc, indent=1), report.markdown(doc)), strict=True):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths


def _provenance() -> dict[str, str]:
    return {
        "git_sha": _git_sha(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
    }


def _git_sha() -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", str(runner.ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        dirty = subprocess.run(
            ["git", "-C", str(runner.ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return sha.strip() + ("+dirty" if dirty.strip() else "")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _mmss(seconds: float) -> str:
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


if __name__ == "__main__":
    raise SystemExit(main())
