"""Strict, bounded YAML for grid files: safe tags only, no duplicate keys, and limits
that a hostile file cannot get past (size, nesting, alias expansion).

A grid is a few kilobytes. Without limits, a "billion laughs" file (aliases of aliases)
is small on disk and huge once its aliases are expanded (dataclasses.asdict, JSON), a
deeply nested one overflows the parser's stack, and a repeated key silently wins.
The limits are checked on the parser's events, before any node is built.

Example:
    >>> load("a: 1\\nb: [x, y]\\n")
    {'a': 1, 'b': ['x', 'y']}
"""

from __future__ import annotations

import logging
from typing import Any

import yaml

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 20  # a grid file larger than 1 MiB is refused unread
MAX_DEPTH = 64  # nested mappings and lists
MAX_NODES = 100_000  # values once every alias is expanded

_Base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when built with it
_MERGE = "tag:yaml.org,2002:merge"


class YamlLimitError(ValueError):
    """A file that breaks a limit or repeats a key; ``where`` is the key or ``file``."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where


class _StrictLoader(_Base):
    """Safe loader whose mappings refuse a key given twice."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            _no_duplicate_keys(self, node)
        return super().construct_mapping(node, deep=deep)


def _no_duplicate_keys(loader: Any, node: yaml.MappingNode) -> None:
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE:  # `<<: *defaults` merges; its keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = lines.get(key)
        except TypeError:  # unhashable: the constructor reports it
            continue
        line = key_node.start_mark.line + 1
        if first is not None:
            raise YamlLimitError(
                str(key), f"key {key!r} appears twice (lines {first} and {line}); give it once"
            )
        lines[key] = line


def load(text: str) -> Any:
    """The one document in ``text``; raises ``YamlLimitError`` past a limit or on a
    repeated key, ``yaml.YAMLError`` on invalid YAML."""
    if len(text.encode("utf-8")) > MAX_BYTES:
        raise YamlLimitError("file", f"larger than {MAX_BYTES} bytes; a grid is a few KiB")
    _check_events(text)
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a safe loader


def _check_events(text: str) -> None:
    """Nesting depth, and the number of values with every alias expanded, counted on
    the parser's events (no node is built): an alias adds the size of its anchor."""
    sizes: dict[str, int] = {}  # anchor -> values under it, expanded
    stack: list[list[Any]] = []  # per open collection: [anchor, values so far]
    total = 0
    for event in yaml.parse(text, Loader=_Base):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= MAX_DEPTH:
                raise YamlLimitError("file", f"nested deeper than {MAX_DEPTH} levels")
            stack.append([event.anchor, 1])
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, count = stack.pop()
            if anchor is not None:
                sizes[anchor] = count
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor in (open_anchor for open_anchor, _ in stack):
                raise YamlLimitError(
                    "file", f"alias *{event.anchor} refers to a value that contains it"
                )
            count = sizes.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            count = 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        else:
            continue
        if stack:
            stack[-1][1] += count
        else:
            total += count
        if stack and stack[-1][1] > MAX_NODES or total > MAX_NODES:
            raise YamlLimitError(
                "file",
                f"more than {MAX_NODES} values once its aliases are expanded "
                "(an alias repeats the whole value it names)",
            )
