"""``orchestrate run``'s local Ray, started while its grid's backbones are built.

Validating a grid builds every backbone on the meta device, after importing timm and
torchvision: about 2 s of one core here, of the 3.7-3.9 s validation takes. A local
Ray's start is 3.5-5 s (with its dashboard), much of it waiting on Ray's own processes.
One after the other, they delayed the first trial by both (benchmarks/command_start.py).
Here the grid is first checked without building backbones (``load_grid(build=False)``:
every name, value and section, the plug-ins imported; then expanded), which is all that
decides how Ray starts; then the whole grid is validated in a thread while the main
thread starts Ray (``ray.init`` installs signal handlers, which only the main thread may
do). So:

- a grid that fails a check that builds nothing starts no Ray: its errors show as soon
  as before;
- one that fails only where a backbone is built (its arguments or input size, a method
  or checkpointing it cannot take) shows its errors as soon as they are found, and the
  command ends once the Ray started for it has stopped (6.7-6.9 s and 11 s here, where
  validating first refused it in 5.1-5.4 s);
- only a fresh output folder on a local path gets it: a sweep resumed may have nothing
  left to run. Elsewhere, and when joining a cluster, the grid is validated first and
  Ray starts with the sweep, as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from orchestrator.expansion import expand
from orchestrator.grid import Grid, GridError, load_grid
from orchestrator.spec import TrialSpec

if TYPE_CHECKING:
    from orchestrator.tune_driver import Connection

log = logging.getLogger(__name__)

T = TypeVar("T")


def checked_for_start(
    path: str, max_trials: int, address: str | None
) -> tuple[Grid, list[TrialSpec]] | None:
    """The grid at ``path`` checked without building its backbones, and its trials,
    where a local Ray may start while they are built; None where Ray must wait for the
    validated grid (an error in it, an output folder with records, a cluster to join).
    Building adds no field to a grid: the validated one equals this one."""
    try:
        grid = load_grid(path, max_trials, build=False)
        specs = expand(grid)
    except (GridError, ValueError):  # ValueError: trials that expand to the same one
        return None  # validated in full before any Ray: every error named, as always
    if not specs or "://" in grid.output or (Path(grid.output) / "records").exists():
        return None  # (no trial: every one excluded, refused before any Ray)
    from orchestrator.tune_driver import starts_local_ray

    return (grid, specs) if starts_local_ray(address) else None


class Background:
    """``work()`` run in a thread; ``result`` waits for it."""

    def __init__(self, work: Callable[[], Any], name: str) -> None:
        self._work = work
        self._outcome: tuple[Any, BaseException | None] = (None, None)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._outcome = (self._work(), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._outcome = (None, exc)

    def result(self) -> Any:
        """What ``work`` returned, or its exception, raised here."""
        self._thread.join()
        value, error = self._outcome
        if error is not None:
            raise error
        return value


def validate_while_starting(
    validate: Callable[[], T], start: Callable[[], Connection], same_start: Callable[[T], bool]
) -> tuple[T, Connection | None]:
    """``validate()`` in a thread while ``start()`` starts Ray here: what ``validate``
    returned, and the connection, or None when Ray did not start or ``same_start`` of the
    validated outcome is false (the file changed since it was first read; that Ray is
    stopped). A grid in error stops the Ray before its error is raised."""
    from orchestrator.tune_driver import disconnect

    validation = Background(validate, "grid-validation")
    try:
        connection = start()  # a stop request (a BaseException) leaves the thread behind
    except Exception as exc:  # noqa: BLE001 - the sweep starts Ray again, and says why not
        log.info("Ray did not start while the grid was validated: %s", exc)
        disconnect()
        return validation.result(), None
    try:
        validated = validation.result()
    except BaseException:
        disconnect()
        raise
    if same_start(validated):
        return validated, connection
    disconnect()
    return validated, None
