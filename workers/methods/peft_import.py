"""peft, imported with bitsandbytes' import-time ``torch.compile`` calls deferred to each
kernel's first call.

bitsandbytes (which peft imports when it is installed) wraps its CPU kernels in
``torch.compile`` as its modules load. ``torch.compile`` compiles nothing until a call,
but it imports Inductor at once to read its configuration: 1-2.5 s here, on the way to
every worker's first LoRA, AdaLoRA or QLoRA trial (``benchmarks/first_trial.py``).
bitsandbytes is therefore first imported under ``compiles_deferred``, then peft.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch

_FIRST_IMPORT = threading.Lock()  # two threads importing at once would nest the patch


def import_peft() -> ModuleType:
    """``peft``, with bitsandbytes first imported under ``compiles_deferred``."""
    if "peft" in sys.modules:  # every later trial of the worker: no lock, no search
        return sys.modules["peft"]
    with _FIRST_IMPORT:
        if "bitsandbytes" not in sys.modules and importlib.util.find_spec("bitsandbytes"):
            with compiles_deferred():
                importlib.import_module("bitsandbytes")
        return importlib.import_module("peft")


@contextlib.contextmanager
def compiles_deferred() -> Iterator[None]:
    """While it lasts, ``torch.compile(fn, **options)`` (or ``torch.compile(**options)(fn)``)
    is ``compile_on_first_call``: meant for bitsandbytes' kernels, whose wrapper runs
    ``fn`` itself when compiling fails, at import or at a call."""
    real = torch.compile

    def deferred(model: Callable | None = None, **options: Any) -> Any:
        if model is None:
            return lambda fn: compile_on_first_call(real, fn, options)
        return compile_on_first_call(real, model, options)

    torch.compile = deferred  # type: ignore[assignment]
    try:
        yield
    finally:
        if torch.compile is deferred:  # what else replaced it meanwhile stays
            torch.compile = real


def compile_on_first_call(
    compiler: Callable[..., Callable], fn: Callable, options: dict[str, Any]
) -> Callable:
    """``fn``, compiled by ``compiler(fn, **options)`` when first called; ``fn`` itself from
    then on when that compile raises (as bitsandbytes falls back when it cannot compile)."""
    compiled: list[Callable] = []
    lock = threading.RLock()

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not compiled:
            with lock:
                if not compiled:
                    try:
                        compiled.append(compiler(fn, **options))
                    except Exception:  # noqa: BLE001  (the function still runs, uncompiled)
                        compiled.append(fn)
        return compiled[0](*args, **kwargs)

    return call
