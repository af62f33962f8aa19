"""TrialSpec: the one object that describes a trial, from grid expansion to its record.

A spec is frozen, round-trips through JSON unchanged, and carries a ``trial_id``
that is a short hash of its canonical JSON, so the same trial gets the same id on
any machine, in any process, in any run. Registry arguments are stored fully
resolved (defaults filled in by the component's config), so a record says exactly
what ran.

Example:
    >>> spec = TrialSpec(backbone="vit_test", method="lora", method_args={"r": 4})
    >>> TrialSpec.from_json(spec.to_json()) == spec
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

TRIAL_KINDS = ("finetune", "baseline")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda")


# TrialSpec fields that joined after records existed (see TrialSpec.to_dict).
LATER_FIELDS = ("deploy",)


# Sane upper bounds of the training sizes: far above any real sweep, far below what
# would exhaust a node before the first step (and inside the records' int64 columns).
MAX_EPOCHS = 100_000
MAX_BATCH = 1 << 20
MAX_STEPS = 10**12


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the byte-stable form that ids hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters shared by every trial of a grid."""

    epochs: int = 3  # passes over the training split
    batch_size: int = 64
    lr: float = 1.0e-3  # peak learning rate of the cosine schedule
    weight_decay: float = 0.05
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    warmup_epochs: float = 0.0  # linear warm-up before the cosine decay
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 only on CUDA)
    eval_batch_size: int = 256
    device: str = "auto"  # auto = cuda when available, else cpu
    max_steps: int = 0  # > 0 stops training early: for quick sweeps and tests

    def __post_init__(self) -> None:
        problems = []
        for name, top in (
            ("epochs", MAX_EPOCHS),
            ("batch_size", MAX_BATCH),
            ("eval_batch_size", MAX_BATCH),
        ):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
            elif value > top:
                problems.append(f"{name} must be at most {top}, got {value!r}")
        if not is_number(self.lr) or self.lr <= 0:
            problems.append(f"lr must be a number > 0, got {self.lr!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            problems.append(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        too_long = (
            is_int(self.epochs)
            and is_number(self.warmup_epochs)
            and (self.warmup_epochs > self.epochs)
        )
        if not is_number(self.warmup_epochs) or self.warmup_epochs < 0 or too_long:
            problems.append(
                f"warmup_epochs must be between 0 and epochs ({self.epochs!r}),"
                f" got {self.warmup_epochs!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.device not in DEVICES:
            problems.append(f"device must be one of {list(DEVICES)}, got {self.device!r}")
        if not is_int(self.max_steps) or self.max_steps < 0:
            problems.append(f"max_steps must be an integer >= 0, got {self.max_steps!r}")
        elif self.max_steps > MAX_STEPS:
            problems.append(f"max_steps must be at most {MAX_STEPS}, got {self.max_steps!r}")
        if problems:
            raise ValueError("; ".join(problems))


def is_number(value: Any) -> bool:
    """A finite int or float (bool, NaN, infinities and ints past float range are not
    numbers of a grid)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _doc(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


def _doc_dict(doc: str) -> Any:
    return field(default_factory=dict, metadata={"doc": doc})


@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial needs; produced by grid expansion (and later by search)."""

    kind: str = _doc("finetune", "finetune | baseline")
    backbone: str = _doc("", "backbone registry name")
    backbone_args: dict[str, Any] = _doc_dict("backbone arguments")
    method: str = _doc("full", "PEFT method registry name ('' for a baseline)")
    method_args: dict[str, Any] = _doc_dict("method arguments")
    checkpointing: str = _doc("none", "checkpointing strategy registry name")
    checkpointing_args: dict[str, Any] = _doc_dict("checkpointing arguments")
    dataset: str = _doc("digits", "dataset registry name")
    dataset_args: dict[str, Any] = _doc_dict("dataset arguments")
    budget_mb: float = _doc(2048.0, "hard memory budget of the trial, MiB")
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = _doc(0, "seed of initialisation, shuffling and augmentation")
    baseline: str = _doc("", "baseline registry name when kind is baseline")
    baseline_args: dict[str, Any] = _doc_dict("baseline arguments")
    deploy: dict[str, Any] = _doc_dict(
        "deployment phase after training (workers.deploy.DeployConfig: variants, ship, "
        "calibration, export); empty: none"
    )

    def __post_init__(self) -> None:
        if self.kind not in TRIAL_KINDS:
            raise ValueError(f"kind must be one of {list(TRIAL_KINDS)}, got {self.kind!r}")
        if isinstance(self.train, dict):  # from JSON
            object.__setattr__(self, "train", TrainConfig(**self.train))
        object.__setattr__(self, "budget_mb", float(self.budget_mb))

    # Frozen dataclasses with dict fields cannot use the generated hash.
    def __hash__(self) -> int:
        return hash(self.trial_id)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        # Fields added after the first sweeps leave the canonical form while they are
        # empty, so a trial that does not use them keeps the id (and the record) it had.
        for name in LATER_FIELDS:
            if not data[name]:
                del data[name]
        return data

    def to_json(self) -> str:
        """``canonical_json(self.to_dict())``, byte for byte, built from pieces: the
        argument dicts and the TrainConfig are shared by the many specs of a grid, so
        each is encoded once (``_piece``) instead of copied and encoded per spec."""
        parts = []
        for value, (key, later) in zip(_sorted_values(self), _SORTED_KEYS, strict=True):
            encode = _SCALARS.get(type(value))
            if encode is not None:
                parts.append(key + encode(value))
            elif not (later and not value):
                parts.append(key + _piece(value))
        return "{" + ",".join(parts) + "}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrialSpec fields {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> TrialSpec:
        return cls.from_dict(json.loads(text))

    @property
    def trial_id(self) -> str:
        """12 hex digits of the SHA-256 of the canonical JSON: stable across processes.
        Computed once per spec (a spec is frozen, its argument dicts are never changed)."""
        held = self.__dict__.get("_trial_id")
        if held is None:
            held = hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:12]
            object.__setattr__(self, "_trial_id", held)  # not a field: eq and replace ignore it
        return held

    @property
    def label(self) -> str:
        """A short human-readable name for tables and progress lines."""
        if self.kind == "baseline":
            return f"{self.baseline}/{self.backbone}/{self.dataset}/s{self.seed}"
        return (
            f"{self.backbone}/{self.method}/{self.checkpointing}/{self.dataset}"
            f"/{self.budget_mb:g}MB/s{self.seed}"
        )


# ---------------------------------------------------------------- canonical pieces

_NAMES = sorted(f.name for f in dataclasses.fields(TrialSpec))  # canonical_json's order
_sorted_values = operator.attrgetter(*_NAMES)
# per field: its JSON key with the colon, and whether it is one of LATER_FIELDS
_SORTED_KEYS = tuple((json.dumps(n) + ":", n in LATER_FIELDS) for n in _NAMES)
# id(value) -> (value, its canonical JSON) for the dicts and TrainConfigs specs share;
# holding the value keeps its id from being reused while it is here
_PIECES: dict[int, tuple[Any, str]] = {}
_PIECES_MAX = 4096


def _float_json(value: float) -> str:
    if not math.isfinite(value):
        canonical_json(value)  # raises json's own error
    return float.__repr__(value)


# what json.dumps writes for a scalar of exactly these types (ensure_ascii strings)
_SCALARS: dict[type, Any] = {
    str: json.encoder.encode_basestring_ascii,
    int: int.__repr__,
    float: _float_json,
    bool: lambda v: "true" if v else "false",
    type(None): lambda v: "null",
}


def _piece(value: Any) -> str:
    """``canonical_json(value)`` of a dict or TrainConfig, memoised for shared objects."""
    if not isinstance(value, dict | TrainConfig):
        return canonical_json(value)
    if not value:
        return "{}"  # each spec's own empty dict (a field's default) is not worth holding
    held = _PIECES.get(id(value))
    if held is not None and held[0] is value:
        return held[1]
    text = canonical_json(dataclasses.asdict(value) if isinstance(value, TrainConfig) else value)
    if len(_PIECES) >= _PIECES_MAX:
        _PIECES.clear()
    _PIECES[id(value)] = (value, text)
    return text
