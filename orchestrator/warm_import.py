"""What a warm worker imports as it starts (``orchestrator.warm_workers.PRELOAD``): the
trial code and the Tune trainable, ``TRIAL_MODULES``, with Python's cyclic garbage
collector paused meanwhile.

Importing them creates about 470,000 objects that live as long as the process. Left
running, the collector scans the growing heap again and again while they are made (635
collections): here the import takes 2.29 s with it running and 1.86 s paused, on the
path of every first trial (benchmarks/overhead.py). Afterwards they are frozen
(``gc.freeze``): no later collection in the trial scans them. The few cycles left over
from the import (a collection would take 0.23 s to find about 7,600 objects) stay, with
the modules, for the life of the worker.
"""

from __future__ import annotations

import gc
import importlib

from orchestrator.warm_workers import TRIAL_MODULES


def import_paused(modules: tuple[str, ...]) -> None:
    """Import ``modules`` with the cyclic collector paused, then freeze what exists and
    let the collector run again (as it was: a process that had it off keeps it off)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for module in modules:
            importlib.import_module(module)
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


import_paused(TRIAL_MODULES)
