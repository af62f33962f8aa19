"""Flat typed columns of a record's arguments: ``method.r``, ``train.lr``, ``dataset.image_size``.

The spec's argument dicts are JSON columns (``method_args``, ...): exact, but every query
needs ``json_extract``. Beside them each argument gets its own typed column named
``<component>.<key>`` (a nested dict's keys joined with dots; a list stays JSON text) and
each training field a ``train.<field>`` column, so ``df[df["method.r"] == 8]`` and DuckDB's
``WHERE "train.lr" < 1e-3`` work.

The flat columns are always derived from the JSON and ``train_*`` columns, never edited
apart from them: a record file of any schema version gets them when it is read, and a
written file carries them for tools that read ``records/`` directly.

Example:
    >>> import pyarrow as pa
    >>> t = with_flat_columns(pa.table({"method_args": ['{"alpha":16.0,"r":8}', "{}"]}))
    >>> t["method.r"].to_pylist(), str(t.schema.field("method.alpha").type)
    ([8, None], 'double')
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import pyarrow as pa

from orchestrator.spec import TrainConfig, canonical_json

log = logging.getLogger(__name__)

# JSON column of the spec -> prefix of its flat columns
ARG_COLUMNS = {
    "backbone_args": "backbone",
    "method_args": "method",
    "checkpointing_args": "checkpointing",
    "dataset_args": "dataset",
    "baseline_args": "baseline",
}
_PY_ARROW = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def train_fields() -> list[tuple[str, pa.DataType, str]]:
    """(column, type, doc) of ``train.<field>`` for every TrainConfig field."""
    return [
        (
            f"train.{f.name}",
            _PY_ARROW[type(f.default)],
            f"grid `train.{f.name}` (the train_{f.name} column, named as in the grid)",
        )
        for f in dataclasses.fields(TrainConfig)
    ]


def is_flat(column: str) -> bool:
    """A derived column (``train.lr``, ``method.r``): every other column name has no dot."""
    return "." in column


def with_flat_columns(table: pa.Table) -> pa.Table:
    """``table`` without any flat columns it had, then ``train.*`` (for the ``train_*``
    columns present) and the argument columns of every JSON column present, sorted by
    name within each component. Each new field's metadata carries its ``doc``."""
    table = table.drop_columns([c for c in table.column_names if is_flat(c)])
    fields, arrays = [], []
    for name, arrow_type, doc in train_fields():
        source = "train_" + name.removeprefix("train.")
        if source in table.column_names:
            fields.append(_field(name, arrow_type, doc))
            arrays.append(table[source].cast(arrow_type))
    for json_column, prefix in ARG_COLUMNS.items():
        if json_column in table.column_names:
            for name, values in _argument_arrays(table[json_column], prefix).items():
                doc = (
                    f"{prefix} argument `{name.removeprefix(prefix + '.')}` from {json_column} "
                    "(empty: the trial has no such argument)"
                )
                fields.append(_field(name, values.type, doc))
                arrays.append(values)
    schema = pa.schema([*table.schema, *fields], metadata=table.schema.metadata)
    return pa.Table.from_arrays([*table.columns, *arrays], schema=schema)


def _field(name: str, arrow_type: pa.DataType, doc: str) -> pa.Field:
    return pa.field(name, arrow_type, metadata={"doc": doc})


def _argument_arrays(column: pa.ChunkedArray, prefix: str) -> dict[str, pa.Array]:
    """``prefix.key`` -> typed values, one per row; each distinct JSON text parsed once
    (a sweep has few distinct argument sets however many trials it has)."""
    encoded = column.combine_chunks().dictionary_encode()
    parsed = [_flatten(_parse(text)) for text in encoded.dictionary.to_pylist()]
    keys = sorted(set().union(*parsed)) if parsed else []
    out = {}
    for key in keys:
        values = _typed([p.get(key) for p in parsed])
        out[f"{prefix}.{key}"] = values.take(encoded.indices)
    return out


def _parse(text: str | None) -> Any:
    """The arguments a JSON column holds ({} for none, or for text that is not JSON)."""
    try:
        return json.loads(text) if text else {}
    except ValueError:
        log.warning("argument column is not JSON, no flat columns from it: %.80s", text)
        return {}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A JSON object's leaves by dotted key; lists (and non-objects) stay whole."""
    if not isinstance(value, dict):
        return {prefix: value} if prefix else {}
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, dict) and item:
            out.update(_flatten(item, name))
        else:
            out[name] = item
    return out


def _typed(values: list[Any]) -> pa.Array:
    """One Arrow array for one argument over the distinct argument sets: bool, int64,
    float64 (ints and floats mixed), else string (anything else, and any number that
    does not fit those, as its JSON). Never fails: a record is written whatever its
    arguments hold."""
    present = [v for v in values if v is not None]
    kinds = {type(v) for v in present}
    try:
        if kinds == {bool}:
            return pa.array(values, pa.bool_())
        if kinds and kinds <= {int, float}:
            return pa.array(values, pa.int64() if kinds == {int} else pa.float64())
    except (pa.ArrowException, OverflowError):
        pass  # an int beyond int64 or float: text
    text = [v if isinstance(v, str) or v is None else _json(v) for v in values]
    return pa.array(text, pa.string())


def _json(value: Any) -> str:
    try:
        return canonical_json(value)
    except (TypeError, ValueError):  # NaN, infinities, a value JSON has no word for
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
