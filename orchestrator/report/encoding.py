"""How a configuration looks in every plot, the PNG figures and the HTML page alike:
colour = method, marker shape = checkpointing, fill = backbone.

Names are given their look in a fixed order (the known checkpointing strategies first,
then sorted names), so that ``none`` / ``static`` / ``adaptive`` look the same in every
report.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from orchestrator.report.analysis import method_name

log = logging.getLogger(__name__)

# matplotlib's tab10, so that a method has the same colour in the PNG and the page.
COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
# (Plotly symbol, matplotlib marker); Plotly's 3-D scatter knows only the first three
# and "cross" / "x", hence SHAPES_3D.
SHAPES = (
    ("circle", "o"),
    ("square", "s"),
    ("diamond", "D"),
    ("triangle-up", "^"),
    ("triangle-down", "v"),
    ("pentagon", "p"),
    ("hexagon", "h"),
    ("star", "*"),
)
SHAPES_3D = ("circle", "square", "diamond", "cross", "x")
KNOWN_CHECKPOINTING = ("none", "static", "adaptive", "compiled")
# Plotly symbol suffix per backbone: filled, open, filled with a dot, open with a dot.
FILLS = ("", "-open", "-dot", "-open-dot")


@dataclass(frozen=True)
class Encoding:
    """The look of every method, checkpointing strategy and backbone of one report."""

    colours: dict[str, str]
    shapes: dict[str, int]
    fills: dict[str, int]

    def symbol(self, checkpointing: str, backbone: str) -> str:
        """The Plotly symbol of a configuration, e.g. ``diamond-open``."""
        return SHAPES[self.shapes[checkpointing]][0] + FILLS[self.fills[backbone]]

    def symbol_3d(self, checkpointing: str, backbone: str) -> str:
        shape = SHAPES_3D[self.shapes[checkpointing] % len(SHAPES_3D)]
        hollow = self.fills[backbone] % 2 == 1 and shape in ("circle", "square", "diamond")
        return shape + ("-open" if hollow else "")

    def marker(self, checkpointing: str) -> str:
        """The matplotlib marker of a checkpointing strategy."""
        return SHAPES[self.shapes[checkpointing]][1]

    def fill(self, backbone: str) -> str:
        """``filled`` | ``open`` | ``dot`` | ``open-dot``: how a backbone's markers are filled."""
        return FILLS[self.fills[backbone]].lstrip("-") or "filled"


def encoding(
    methods: Iterable[str], checkpointing: Iterable[str], backbones: Iterable[str]
) -> Encoding:
    """Colours, shapes and fills by name; they repeat past their number (10, 8 and 4)."""
    others = sorted(set(checkpointing) - set(KNOWN_CHECKPOINTING))
    slots = {
        **{c: i for i, c in enumerate(KNOWN_CHECKPOINTING)},
        **{c: len(KNOWN_CHECKPOINTING) + i for i, c in enumerate(others)},
    }
    return Encoding(
        colours={m: COLOURS[i % len(COLOURS)] for i, m in enumerate(sorted(set(methods)))},
        shapes={c: slots[c] % len(SHAPES) for c in sorted(set(checkpointing))},
        fills={b: i % len(FILLS) for i, b in enumerate(sorted(set(backbones)))},
    )


def of_configs(configs: pd.DataFrame) -> Encoding:
    """The encoding of every configuration of an ``aggregate_seeds`` table."""
    rows = configs.to_dict("records")
    return encoding(
        [method_name(r) for r in rows],
        [strategy(r) for r in rows],
        [str(r.get("backbone")) for r in rows],
    )


def strategy(row: Mapping[str, Any]) -> str:
    """A configuration's checkpointing strategy (``none`` for a baseline, which has none)."""
    return str(row.get("checkpointing") or "none")
