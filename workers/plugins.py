"""Plug-ins: a user's modules that register components with the project's registries.

A plug-in is an ordinary Python module that, when imported, calls the same
registration decorators as the project's own components (``BACKBONES.register``,
``METHODS.register``, the dataset, baseline and energy meter registries). It is found
two ways:

- the entry-point group ``vramsweep.plugins`` of any installed distribution (each
  entry point names a module), loaded once per process;
- the grid's ``plugins:`` field: module names, or paths of a ``.py`` file or a package
  folder (relative to the grid file).

Both the driver (before the grid is validated) and every Ray worker (before a trial
runs) import them; ``shipped_paths`` says which of them a cluster's workers cannot
import from their own environment and must receive with the Ray runtime environment.

Example:
    >>> load_plugins(["json"])  # any importable module
    ('json',)
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import importlib.util
import logging
import os
import re
import site
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "vramsweep.plugins"
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class PluginError(Exception):
    """A plug-in that cannot be loaded; ``what`` names it, ``reason`` says why."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.what, self.reason = what, reason


def load_plugins(entries: Sequence[str] = (), base: Path | None = None) -> tuple[str, ...]:
    """Load the entry-point plug-ins, then import ``entries``; their module names.

    Idempotent: a module already imported is not imported again (so nothing registers
    twice). ``base`` is the folder that relative paths are resolved against.
    """
    load_entry_points()
    return tuple(import_plugin(entry, base) for entry in entries)


@functools.cache  # once per process: a failure is not cached, so it is raised again
def load_entry_points() -> tuple[str, ...]:
    """Import the module of every entry point of the group ``vramsweep.plugins``."""
    loaded = []
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep.dist, "name", None) or "an unknown distribution"
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - any failure of the user's code is reported
            raise PluginError(
                f"entry point {ep.name!r} = {ep.value!r} of distribution {dist!r} "
                f"(group {ENTRY_POINT_GROUP})",
                _why(exc),
            ) from exc
        log.info("plug-in %s loaded (entry point of %s)", ep.value, dist)
        loaded.append(ep.value)
    return tuple(loaded)


def import_plugin(entry: str, base: Path | None = None) -> str:
    """Import one plug-in, given as a module name or as a path; its module name.

    A path (a ``.py`` file, or a package folder with ``__init__.py`` written with a
    slash: ``./my_pkg``) is resolved against ``base`` (default: the working directory);
    the folder above it (above its top package, for a module inside a package) is
    appended to ``sys.path`` and the module imported by its dotted name, which must
    then be that file (not another module of the same name found first).
    """
    is_path = entry.endswith(".py") or "/" in entry or os.sep in entry
    if not is_path:
        if not _MODULE_NAME.fullmatch(entry):
            raise PluginError(
                repr(entry), "neither a module name (a.b.c) nor a path (./ext.py, ./my_pkg)"
            )
        return _import(entry, entry, expected=None)
    path = Path(entry).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    path = path.resolve()
    if path.suffix == ".py" and path.is_file():
        parts, expected = [path.stem], path
    elif path.is_dir() and (path / "__init__.py").is_file():
        parts, expected = [path.name], path / "__init__.py"
    elif path.is_dir():
        raise PluginError(repr(entry), f"{path} is a folder without __init__.py, not a package")
    else:
        raise PluginError(repr(entry), f"no such .py file or package folder: {path}")
    folder = path.parent
    while (folder / "__init__.py").is_file():  # a module inside a package: a.b.c
        parts.insert(0, folder.name)
        folder = folder.parent
    name = ".".join(parts)
    if not _MODULE_NAME.fullmatch(name):
        raise PluginError(repr(entry), f"{name!r} cannot be imported: not a Python identifier")
    if str(folder) not in sys.path:
        sys.path.append(str(folder))  # appended: it shadows no module found before it
    return _import(entry, name, expected)


def _import(entry: str, name: str, expected: Path | None) -> str:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise PluginError(
                repr(entry),
                f"no module named {exc.name!r} (not installed and not on the Python path; "
                "a file or package next to the grid is given as a path: ./my_ext.py)",
            ) from exc
        raise PluginError(repr(entry), f"the module fails to import: {_why(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - any failure of the user's code is reported
        raise PluginError(repr(entry), f"the module fails to import: {_why(exc)}") from exc
    found = getattr(module, "__file__", None)
    if expected is not None and (found is None or Path(found).resolve() != expected):
        raise PluginError(
            repr(entry), f"another module named {name!r} is imported instead ({found}): rename it"
        )
    log.info("plug-in %s imported from %s", name, found)
    return name


def _why(exc: BaseException) -> str:
    """The exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# ---------------------------------------------------------------- shipping to a cluster


def shipped_paths(modules: Sequence[str]) -> list[str]:
    """What the Ray runtime environment must carry (``py_modules``) so that workers can
    import ``modules`` (already imported here): the top-level package folder or
    single file of each one that is not part of an installed distribution, nor under
    site-packages or the standard library. A cluster's workers are assumed to have the
    driver's installed environment (the same image), but not its other files.
    """
    installed = md.packages_distributions()
    places = [*site.getsitepackages(), site.getusersitepackages()]
    places += [sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    roots = [Path(p).resolve() for p in places if p]
    out: list[str] = []
    for module in modules:
        top = module.split(".")[0]
        if top in installed or top in sys.builtin_module_names:
            continue
        spec = importlib.util.find_spec(top)
        if spec is None:
            raise PluginError(repr(module), f"{top!r} is not importable here")
        if spec.submodule_search_locations:  # a package (a namespace one may have several)
            paths = [Path(p) for p in spec.submodule_search_locations]
        elif spec.origin and spec.has_location:
            paths = [Path(spec.origin)]
        else:
            continue  # frozen or built in
        for path in paths:
            path = path.resolve()
            if any(path.is_relative_to(root) for root in roots):
                continue
            if str(path) not in out:
                out.append(str(path))
    return out
