"""A trial worker process as Ray starts one: ``python -m benchmarks.gpucheck.worker``.

Ray's raylet starts each worker as a fresh Python interpreter with the GPU it assigned in
``CUDA_VISIBLE_DEVICES`` and ``OMP_NUM_THREADS`` set to the trial's CPUs; the Tune
trainable (``orchestrator.tune_driver._run_spec``) then calls ``run_trial`` with the
trial's threads and ``exclusive=False`` for a fraction of a GPU, and a reused worker
runs the next trial in the same process. This does the same without Ray (not in the
device image): the specs of ``--specs`` (one JSON per line) one after another, each
record written to ``--out`` as soon as it ends. The dataset is built in the worker
(Ray would map it from its object store: synthetic data takes milliseconds).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from orchestrator.spec import TrialSpec
from workers.energy import EnergyConfig
from workers.trial import run_trial


def worker_env(threads: int) -> dict[str, str]:
    """The environment Ray gives a worker of a GPU trial with ``threads`` CPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    return {**os.environ, "CUDA_VISIBLE_DEVICES": visible, "OMP_NUM_THREADS": str(threads)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gpu-share", type=float, default=0.0, help="GPUs the trial asked for")
    args = parser.parse_args(argv)
    specs = [TrialSpec.from_json(line) for line in args.specs.read_text().splitlines() if line]
    state: dict[str, Any] = {"pid": os.getpid(), "ready_at": time.time(), "records": []}
    _write(args.out, state)
    # tune_driver.gpu_exclusive: a whole GPU is exclusive, a fraction is a share, CPU unknown
    exclusive = None if args.gpu_share <= 0 else args.gpu_share >= 1
    for spec in specs:
        record = run_trial(
            spec, num_threads=args.threads, energy=EnergyConfig(), exclusive=exclusive
        )
        state["records"].append(record.to_json())
        state["ended_at"] = time.time()
        _write(args.out, state)
    return 0


def _write(out: Path, state: dict[str, Any]) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, out)


if __name__ == "__main__":
    raise SystemExit(main())
