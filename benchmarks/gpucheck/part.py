"""One part of the check in its own process: ``python -m benchmarks.gpucheck.part NAME ...``.

Started by ``benchmarks.gpucheck.runner``; writes the part's figures to ``--out`` as
they come and ends with status ``ok`` or ``failed`` (with the traceback). Exit code 0
whenever the result file says what happened.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import logging
import platform
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpucheck.context import PartContext
from benchmarks.gpucheck.parts import BY_NAME
from benchmarks.gpucheck.sizes import sizes

log = logging.getLogger(__name__)

# A part stops its optional measurements this long before the check would kill it.
SAFETY_S = 5.0
PACKAGES = (
    "timm",
    "peft",
    "transformers",
    "torchvision",
    "nvidia-ml-py",
    "bitsandbytes",
    "mamba-ssm",
    "ray",
    "optuna",
    "open_clip_torch",
)


class NoCuda(RuntimeError):
    """The check was asked to run on CUDA and none is visible."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=sorted(BY_NAME))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--limit-s", type=float, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ctx = PartContext(
        name=args.part,
        device=torch.device(args.device),
        sizes=sizes(args.tiny),
        tiny=args.tiny,
        deadline=time.monotonic() + args.limit_s - SAFETY_S,
        out=args.out,
    )
    torch.set_num_threads(ctx.sizes.threads)
    try:
        ctx.environment = environment(ctx.device)
        module = importlib.import_module(BY_NAME[args.part].module)
        module.run(ctx)
        ctx.finish("ok")
    except NoCuda as exc:
        ctx.environment["no_cuda"] = True
        ctx.finish("failed", str(exc))
    except Exception as exc:  # noqa: BLE001 - the result file says what happened
        log.exception("part %s failed", args.part)
        ctx.finish("failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=12)}")
    return 0


def environment(device: torch.device) -> dict[str, Any]:
    """The software and the device this part ran on."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "packages": {name: _version(name) for name in PACKAGES},
    }
    if device.type == "cpu":
        env["device_name"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
        return env
    if not torch.cuda.is_available():
        raise NoCuda("CUDA was asked for but torch sees no CUDA device (on a CPU: --cpu)")
    props = torch.cuda.get_device_properties(device)
    env.update(
        device_name=props.name,
        total_memory_mib=round(props.total_memory / 2**20),
        multiprocessors=props.multi_processor_count,
        capability=f"{props.major}.{props.minor}",
        driver=_driver(),
    )
    return env


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _driver() -> str | None:
    if importlib.util.find_spec("pynvml") is None:
        return None
    import pynvml

    try:
        pynvml.nvmlInit()
        try:
            return str(pynvml.nvmlSystemGetDriverVersion())
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
