"""The NetScore family: accuracy against a size and a cost, in decibels (pure functions).

NetScore (Wong 2018, "NetScore: Towards Universal Metrics for Large-scale Performance
Analysis of Deep Neural Networks for Practical On-Device Edge Usage",
https://arxiv.org/abs/1806.05512):

    Omega = 20 * log10( a^alpha / (p^beta * m^gamma) )

with ``a`` the top-1 accuracy in %, ``p`` the parameters in millions and ``m`` the
forward multiply-accumulates per image in billions; alpha = 2, beta = 0.5,
gamma = 0.5. Every variant here keeps that form and swaps what fills the size slot
(``p``, exponent beta) or the cost slot (``m``, exponent gamma); its ``Variant``
names the record columns and units, so a score can always be recomputed from the
raw columns of a record, with other exponents too. A variant whose column is missing
from the records is skipped with a note, not guessed. The ``netscore_deploy_*``
variants score the model a trial's deployment phase ships (``deploy_*`` columns): its
own accuracy, its size on disk or inference memory, its latency.

Example:
    >>> import pandas as pd
    >>> df = pd.DataFrame({"accuracy": [0.761], "params_total": [25.6e6], "macs": [4.1e9]})
    >>> round(float(netscores(df, ["netscore"]).table["netscore"][0]), 2)
    55.05
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# Wong 2018's exponents: accuracy counts twice as much, in log terms, as size and cost.
ALPHA = 2.0
BETA = 0.5
GAMMA = 0.5


@dataclass(frozen=True)
class Component:
    """A record column as it enters a score: ``value = record[column] / scale`` in ``unit``."""

    column: str
    scale: float
    unit: str
    label: str


@dataclass(frozen=True)
class Variant:
    """One member of the family: which component fills the size slot and which the cost
    slot, and which column is the accuracy (the trained model's, or the deployed one's)."""

    name: str
    title: str
    size: Component
    cost: Component
    accuracy: str = "accuracy"


PARAMS = Component("params_total", 1e6, "M", "parameters")
MACS = Component("macs", 1e9, "GMAC", "forward MACs per image")
TRAIN_MEMORY = Component("peak_mem_mb", 1024.0, "GiB", "peak training memory")
TRAIN_ENERGY = Component("energy_j", 1e3, "kJ", "training energy")
INFER_LATENCY = Component("infer_latency_ms_b1", 1.0, "ms", "inference latency, batch 1")
INFER_MEMORY = Component("infer_peak_mem_mb_b1", 1024.0, "GiB", "inference peak memory, batch 1")
# The deployment phase's shipped variant (workers.deploy): merged, maybe quantized.
DEPLOY_SIZE = Component("deploy_size_mb", 1.0, "MiB", "deployed model's size on disk")
DEPLOY_LATENCY = Component("deploy_latency_ms_b1", 1.0, "ms", "deployed inference latency, batch 1")
DEPLOY_MEMORY = Component(
    "deploy_peak_mem_mb_b1", 1024.0, "GiB", "deployed inference peak memory, batch 1"
)

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("netscore", "NetScore (Wong 2018)", PARAMS, MACS),
        Variant("netscore_mem", "NetScore-M: training memory for parameters", TRAIN_MEMORY, MACS),
        Variant("netscore_energy", "NetScore-E: training energy for MACs", PARAMS, TRAIN_ENERGY),
        Variant(
            "netscore_latency", "NetScore-L: inference latency for MACs", PARAMS, INFER_LATENCY
        ),
        Variant(
            "netscore_infer_mem",
            "NetScore-IM: inference memory for parameters",
            INFER_MEMORY,
            MACS,
        ),
        # the deployed variant's accuracy; its bytes on disk stand for the parameters
        # (quantization shrinks the bytes, not the count)
        Variant(
            "netscore_deploy_latency",
            "NetScore-DL: deployed model, size on disk for parameters, latency for MACs",
            DEPLOY_SIZE,
            DEPLOY_LATENCY,
            accuracy="deploy_accuracy",
        ),
        Variant(
            "netscore_deploy_mem",
            "NetScore-DM: deployed model, inference memory for parameters",
            DEPLOY_MEMORY,
            MACS,
            accuracy="deploy_accuracy",
        ),
    )
}


def netscore(
    accuracy_pct: np.ndarray | float,
    size: np.ndarray | float,
    cost: np.ndarray | float,
    *,
    alpha: float = ALPHA,
    beta: float = BETA,
    gamma: float = GAMMA,
) -> np.ndarray:
    """``20 log10(a^alpha / (size^beta cost^gamma))``, element-wise, in dB.

    Computed as a sum of logs (no overflow for any exponent). NaN where a value the
    score needs is missing or not positive; a slot whose exponent is 0 is not needed.
    """
    slots = [np.asarray(x, dtype=float) for x in (accuracy_pct, size, cost)]
    total = np.zeros(np.broadcast_shapes(*(x.shape for x in slots)))
    for x, exponent in zip(slots, (alpha, -beta, -gamma), strict=True):
        if exponent != 0:
            positive = x > 0
            total = total + np.where(
                positive, exponent * np.log10(np.where(positive, x, 1.0)), np.nan
            )
    return 20.0 * total


@dataclass(frozen=True)
class NetScores:
    """Scores of a table, one column per variant computed (same index as the input).

    ``skipped`` says why a variant was not computed; ``notes`` why some rows have none.
    """

    table: pd.DataFrame
    alpha: float
    beta: float
    gamma: float
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def netscores(
    df: pd.DataFrame,
    variants: Sequence[str] | None = None,
    *,
    alpha: float = ALPHA,
    beta: float = BETA,
    gamma: float = GAMMA,
) -> NetScores:
    """NetScore variants of every row of ``df`` (``accuracy`` as a fraction, raw record units).

    ``variants`` are keys of ``VARIANTS`` (default: all, except that the variants of the
    deployed model join only when some record has a deployment phase: a sweep without
    one would list them as not computed in every report). Rows are scored as given:
    pass ok trials, or configurations averaged over seeds.
    """
    if variants is None:
        names = [
            name
            for name, v in VARIANTS.items()
            if v.accuracy == "accuracy" or _column(df, v.accuracy).notna().any()
        ]
    else:
        names = list(variants)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown NetScore variants {unknown}; valid: {list(VARIANTS)}")
    table = pd.DataFrame(index=df.index)
    skipped: dict[str, str] = {}
    notes: dict[str, str] = {}
    for name in names:
        variant = VARIANTS[name]
        accuracy = _column(df, variant.accuracy)
        slots = [(variant.size, beta), (variant.cost, gamma)]
        absent = [c.column for c, e in slots if e != 0 and _column(df, c.column).isna().all()]
        if accuracy.isna().all():
            absent.insert(0, variant.accuracy)
        if absent:
            skipped[name] = f"no {', '.join(absent)}"
            log.info("NetScore variant %s skipped: %s", name, skipped[name])
            continue
        size = _column(df, variant.size.column) / variant.size.scale
        cost = _column(df, variant.cost.column) / variant.cost.scale
        scores = netscore(100.0 * accuracy, size, cost, alpha=alpha, beta=beta, gamma=gamma)
        table[name] = scores
        unscored = int(np.isnan(scores).sum())
        if unscored:
            notes[name] = f"{unscored} of {len(df)} rows lack a positive value it needs"
    return NetScores(table, alpha, beta, gamma, skipped, notes)


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column, or all-NaN when the records predate it."""
    if name not in df:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[name], errors="coerce").astype(float)
