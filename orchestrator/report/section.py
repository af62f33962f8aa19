"""A section that the caller puts at the top of the report (a search's result)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Section:
    """A heading, a paragraph and a table, shown before the findings."""

    title: str
    text: str
    table: pd.DataFrame
