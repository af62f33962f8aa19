"""A worker's first trial of a peft method, with peft imported as the trial imports it
(``workers.methods.peft_import``: bitsandbytes' ``torch.compile`` deferred to the first
call) and with a plain ``import peft``, in one run.

Each repeat runs both, in alternating order, as fresh processes that first import what a
warm worker imports (``orchestrator.warm_workers.TRIAL_MODULES``) and then run one trial
of ``--method`` on the tiny grid of ``benchmarks/overhead.py`` (vit_test at 16 px, 4
steps), and prints the trial's whole time (``run_trial``) and its time to the first
training step; then the medians and their ratios (plain / ours).

    .venv/bin/python -m benchmarks.first_trial [--method lora] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

TRIAL = """
import importlib, json, sys, time
from orchestrator.warm_workers import TRIAL_MODULES
for module in TRIAL_MODULES:
    importlib.import_module(module)
if sys.argv[1] == "plain":  # peft imported as before workers.methods.peft_import
    for name in ("lora", "adalora", "qlora"):
        module = importlib.import_module("workers.methods." + name)
        module.import_peft = lambda: importlib.import_module("peft")
from orchestrator.expansion import expand
from orchestrator.grid import load_grid
from workers.trial import run_trial
spec = expand(load_grid(sys.argv[2]))[0]
start = time.perf_counter()
record = run_trial(spec, num_threads=1)
print(json.dumps({"status": record.status, "trial_s": time.perf_counter() - start,
                  "first_step_s": record.first_step_s}))
"""
ARMS = ("deferred", "plain")
ROOT = Path(__file__).resolve().parents[1]


def one_trial(arm: str, grid: str) -> dict:
    """One fresh process's first trial (``arm``: "deferred" or "plain")."""
    proc = subprocess.run(
        [sys.executable, "-c", TRIAL, arm, grid], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the {arm} trial's process failed:\n{proc.stderr[-3000:]}")
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    if run["status"] != "ok":
        raise RuntimeError(f"the {arm} trial ended {run['status']}: nothing to time")
    return run


def main() -> None:
    from benchmarks.overhead import tiny_grid

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="lora", help="a peft method: lora, adalora, qlora")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, method {args.method}")
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tiny_grid(1, 4, tmp))
        fields = yaml.safe_load(grid.read_text())
        grid.write_text(yaml.safe_dump({**fields, "methods": {args.method: {}}}))
        for i in range(args.repeats):
            for arm in ARMS if i % 2 == 0 else ARMS[::-1]:
                run = one_trial(arm, str(grid))
                runs[arm].append(run)
                print(
                    f"  {arm:9s} {run['status']:4s} trial {run['trial_s']:.2f} s, "
                    f"first step {run['first_step_s']:.2f} s",
                    flush=True,
                )
    medians = {
        arm: {key: statistics.median(r[key] for r in rs) for key in ("trial_s", "first_step_s")}
        for arm, rs in runs.items()
    }
    ours, plain = medians["deferred"], medians["plain"]
    spread = {
        arm: (min(r["trial_s"] for r in rs), max(r["trial_s"] for r in rs))
        for arm, rs in runs.items()
    }
    print(
        f"medians of {args.repeats}: first trial {ours['trial_s']:.2f} s deferred, "
        f"{plain['trial_s']:.2f} s plain ({plain['trial_s'] / ours['trial_s']:.2f}x); "
        f"first step {ours['first_step_s']:.2f} s / {plain['first_step_s']:.2f} s "
        f"({plain['first_step_s'] / ours['first_step_s']:.2f}x); first trial ranges "
        + ", ".join(f"{arm} {low:.2f}-{high:.2f} s" for arm, (low, high) in spread.items())
    )


if __name__ == "__main__":
    main()
