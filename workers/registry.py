"""Registries of named components (backbones, methods, checkpointing, datasets, ...).

A registry maps a lowercase name to a builder and the dataclass that holds the
builder's arguments. Grids are validated against registries before anything runs:
an unknown name fails with the list of valid names, an unknown or ill-typed
argument fails with the component's valid arguments.

Example:
    >>> REG = Registry("widget")
    >>> @dataclass(frozen=True)
    ... class WidgetConfig:
    ...     size: int = 3
    >>> @REG.register(config_cls=WidgetConfig)
    ... def small(config):
    ...     return config.size
    >>> REG.resolve_args("small", {"size": 4})
    {'size': 4}
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class RegistryError(ValueError):
    """A name or an argument that the registry does not accept."""


@dataclass(frozen=True)
class NoArgs:
    """Config of a component that takes no arguments."""


@dataclass(frozen=True)
class Entry:
    name: str
    builder: Callable[..., Any]
    config_cls: type
    doc: str
    tags: frozenset[str] = frozenset()  # e.g. a backbone's family, the families a method fits


class Registry:
    """Name -> (builder, config dataclass). Names are lowercase and unique."""

    def __init__(
        self,
        kind: str,
        fallback: Callable[[str], Entry | None] | None = None,
        candidates: Callable[[], list[str]] | None = None,
    ) -> None:
        """``fallback(name)``: the entry of a name that is not registered but that the
        registry still knows how to build (any timm model for backbones), or None.
        ``candidates()``: such names, for the close matches of an unknown name."""
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._fallback = fallback
        self._candidates = candidates

    def register(
        self,
        name: str | None = None,
        *,
        config_cls: type = NoArgs,
        tags: tuple[str, ...] | frozenset[str] = (),
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register ``fn`` under ``name`` (default: the function's name).

        ``tags`` are free-form labels read by other parts (a backbone's family; the
        backbone families a method applies to).
        """

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key != key.lower():
                raise RegistryError(f"{self.kind} names are lowercase, got {key!r}")
            if key in self._entries:
                raise RegistryError(f"{self.kind} {key!r} is already registered")
            if not dataclasses.is_dataclass(config_cls):
                raise RegistryError(f"config_cls of {self.kind} {key!r} must be a dataclass")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._entries[key] = Entry(key, fn, config_cls, doc[0] if doc else "", frozenset(tags))
            return fn

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) is not None

    def is_registered(self, name: str) -> bool:
        """True for a registered name (not one the fallback resolves)."""
        return name in self._entries

    def _find(self, name: str) -> Entry | None:
        entry = self._entries.get(name)
        if entry is None and self._fallback is not None:
            entry = self._fallback(name)
        return entry

    def get(self, name: str) -> Entry:
        entry = self._find(name) if isinstance(name, str) else None
        if entry is not None:
            return entry
        raise RegistryError(self.unknown_message(name))

    def unknown_message(self, name: Any) -> str:
        """What to tell about an unknown name: the registered names and close matches."""
        valid = ", ".join(self.names()) or "(none registered yet)"
        message = f"unknown {self.kind} {name!r}; valid: {valid}"
        known = self.names() + (self._candidates() if self._candidates else [])
        close = difflib.get_close_matches(str(name), known, n=5, cutoff=0.6)
        return message + (f"; did you mean {', '.join(close)}?" if close else "")

    def make_config(self, name: str, args: dict[str, Any] | None) -> Any:
        """The validated config of ``name`` built from ``args`` (defaults filled in)."""
        entry = self.get(name)
        args = dict(args or {})
        fields = {f.name: f for f in dataclasses.fields(entry.config_cls)}
        unknown = sorted(map(str, set(args) - set(fields)))  # keys may be any YAML scalar
        if unknown:
            valid = ", ".join(sorted(fields)) or "(it takes none)"
            raise RegistryError(
                f"{self.kind} {name!r}: unknown argument(s) {unknown}; valid: {valid}"
            )
        hints = typing.get_type_hints(entry.config_cls)
        for key, value in args.items():
            args[key] = _check_type(f"{self.kind} {name!r}: argument {key!r}", value, hints[key])
        try:
            return entry.config_cls(**args)
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"{self.kind} {name!r}: {exc}") from None

    def resolve_args(self, name: str, args: dict[str, Any] | None) -> dict[str, Any]:
        """``args`` validated and completed with defaults, as a plain JSON-able dict.

        A field that a config lists in its ``LATER_FIELDS`` class attribute (added after
        records existed) is left out while it has its default, so that a trial that does
        not use it keeps the trial id it had before the field existed.
        """
        config = self.make_config(name, args)
        resolved = _jsonable(dataclasses.asdict(config))
        defaults = {f.name: f for f in dataclasses.fields(config)}
        for key in getattr(config, "LATER_FIELDS", ()):
            if key in resolved and resolved[key] == _jsonable(_default(defaults[key])):
                del resolved[key]
        return resolved

    def build(self, name: str, args: dict[str, Any] | None, *pos: Any, **kw: Any) -> Any:
        """Call the builder of ``name`` with its validated config and extra arguments."""
        return self.get(name).builder(self.make_config(name, args), *pos, **kw)


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# What any argument value may hold: numbers the records' int64/float64 columns and
# JSON can carry, strings no longer than a path may be (nothing reads longer ones).
INT_RANGE = (-(1 << 63), (1 << 63) - 1)
MAX_STRING = 4096
JSON_TYPES = (str, int, float, bool, type(None), list, tuple, dict)


def check_value(where: str, value: Any) -> None:
    """Reject anything but JSON values (a spec is canonical JSON), NaN, infinities, ints
    outside int64, strings over ``MAX_STRING`` characters or with a NUL, mapping keys
    that are not strings, anywhere inside ``value`` (lists and dicts included)."""
    if not isinstance(value, JSON_TYPES):
        raise RegistryError(
            f"{where} must be a string, number, boolean, null, list or mapping, "
            f"got {type(value).__name__} {value!r}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise RegistryError(f"{where} must be a finite number, got {value!r}")
    if isinstance(value, int) and not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise RegistryError(f"{where} must fit in 64 bits, got {value!r}")
    if isinstance(value, str) and (len(value) > MAX_STRING or "\x00" in value):
        raise RegistryError(
            f"{where} must be a string of at most {MAX_STRING} characters without NUL, "
            f"got {len(value)} characters: {value[:80]!r}"
        )
    if isinstance(value, list | tuple):
        for item in value:
            check_value(where, item)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise RegistryError(f"{where} keys must be strings, got {key!r}")
            check_value(f"{where} key", key)
            check_value(f"{where}[{key!r}]", item)


def _check_type(where: str, value: Any, hint: Any) -> Any:
    """Check a value against its annotation, then ``check_value``; ints are accepted
    (and converted) for floats."""
    value = _match_type(where, value, hint)
    check_value(where, value)
    return value


def _match_type(where: str, value: Any, hint: Any) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return value
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise RegistryError(f"{where} must be a finite number, got {value!r}") from None
        if option is str and isinstance(value, str):
            return value
        origin = typing.get_origin(option) or option
        if origin in (tuple, list) and isinstance(value, list | tuple):
            return tuple(value)
        if origin is dict and isinstance(value, dict):
            return value
        if option is Any:
            return value
    names = " | ".join(getattr(o, "__name__", str(o)) for o in options)
    raise RegistryError(f"{where} must be {names}, got {value!r}")
