"""peft, imported without compiling bitsandbytes' kernels as it loads.

Importing peft imports bitsandbytes when it is installed, and bitsandbytes wraps its
CPU kernels in ``torch.compile`` as its modules load. ``torch.compile`` itself compiles
on a function's first call, but it imports Inductor (and with it Triton) right away to
read Inductor's configuration: 2.5 s of the 5.5 s that importing peft took here, on
the way to every worker's first LoRA, AdaLoRA or QLoRA trial, whether or not the trial
ever calls those kernels (QLoRA's quantized layers may, by their backend; here on CPU
they did not). While peft is first imported,
``torch.compile`` is ``compile_on_first_call``: the same compile, with the same
options, made when the function is first called (benchmarks/overhead.py prints each
trial's time to its first step).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch


def import_peft() -> ModuleType:
    """``peft`` (imported under ``compiles_deferred`` the first time)."""
    if "peft" in sys.modules:
        return sys.modules["peft"]
    with compiles_deferred():
        return importlib.import_module("peft")


@contextlib.contextmanager
def compiles_deferred() -> Iterator[None]:
    """While it lasts, ``torch.compile(fn, **options)`` is ``compile_on_first_call``."""
    real = torch.compile

    def deferred(model: Callable | None = None, **options: Any) -> Any:
        if model is None:  # used as ``@torch.compile(**options)``
            return lambda fn: compile_on_first_call(real, fn, options)
        return compile_on_first_call(real, model, options)

    torch.compile = deferred  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = real


def compile_on_first_call(
    compile: Callable[..., Callable], fn: Callable, options: dict[str, Any]
) -> Callable:
    """``fn``, compiled by ``compile(fn, **options)`` when first called; ``fn`` itself from
    then on when that compile raises (as bitsandbytes falls back when it cannot compile)."""
    compiled: list[Callable] = []
    lock = threading.Lock()

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not compiled:
            with lock:
                if not compiled:
                    try:
                        compiled.append(compile(fn, **options))
                    except Exception:  # noqa: BLE001  (the function still runs, uncompiled)
                        compiled.append(fn)
        return compiled[0](*args, **kwargs)

    return call
