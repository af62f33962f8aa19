"""TrialRecord, its Arrow schema, and the record store: the only module that writes records.

One row per trial in the Parquet dataset ``OUTPUT/records/``: a file per record
(``<trial_id>.parquet``) or a part holding several (a group commit of records that finish
together, or a compaction of small files: ``orchestrator.compaction``). Every file is
written atomically (temporary file, fsync, rename), so a crash never leaves half a record
and a resumed sweep skips every trial id that already has one. Failures are records too
(status ``failed``, ``oom``, ``over_budget``). A trial recorded again (``--retry-failed``)
is the newest of its rows (``recorded_at``).

The schema is defined once, here: the columns of the spec (flattened), then the
fields of ``TrialRecord`` in declaration order, each with a unit in its name and a
doc string (``describe_schema()`` prints the table that the README shows). Its
version, ``SCHEMA_VERSION`` (column ``schema_version``, Parquet metadata), is bumped
whenever columns change; version 4 added the deployment phase: the spec's ``deploy``
column and the ``deploy_*`` columns; version 5 ``data_skipped_images``; version 6
``ckpt_profile_s`` and ``ckpt_profile_cached``; version 7 the memory of every phase
(``eval_batch_size_used``, ``eval_peak_mem_mb``, ``rss_limit_mb``, ``*_rss_peak_mb``);
version 8 the flat typed argument columns (``train.lr``, ``method.r``: see
``orchestrator.record_columns``) and ``recorded_at``. Older record files still collect
(their missing columns are empty, their flat columns derived from their JSON columns).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import compaction
from orchestrator.compaction import StoredFile
from orchestrator.record_columns import ARG_COLUMNS, is_flat, train_fields, with_flat_columns
from orchestrator.spec import TrainConfig, TrialSpec, canonical_json

log = logging.getLogger(__name__)

# 2: checkpointing plan columns; 3: dataset options (data source, wait, validation
# accuracy); 4: the deployment phase (spec column `deploy`, deploy_* columns);
# 5: data_skipped_images; 6: ckpt_profile_s, ckpt_profile_cached (train_time_s no
# longer includes block profiling); 7: memory per phase (eval_batch_size_used,
# eval_peak_mem_mb, rss_limit_mb, *_rss_peak_mb); 8: flat typed columns beside the JSON
# ones (train.<field> for every train field, <component>.<key> for every argument of
# backbone_args, method_args, checkpointing_args, dataset_args, baseline_args) and
# recorded_at (the newest row of a trial wins); records may share a file (parts).
SCHEMA_VERSION = 8
QUARANTINE = "quarantine"  # folder beside records/ that unreadable record files move to
# stopped: a grid's scheduler (orchestrator.scheduler) ended it early; figures so far
STATUSES = ("ok", "oom", "over_budget", "failed", "skipped", "stopped")

_ARROW = {"str": pa.string(), "float": pa.float64(), "int": pa.int64(), "bool": pa.bool_()}


def _col(kind: str, doc: str, default: Any = None) -> Any:
    return field(default=default, metadata={"arrow": kind, "doc": doc})


@dataclass
class TrialRecord:
    """The outcome of one trial: its spec plus status, metrics, costs and provenance."""

    spec: TrialSpec
    status: str = _col("str", "ok | oom | over_budget | failed | skipped | stopped", "failed")
    error: str = _col("str", "error text when status is not ok", "")
    # metrics (held-out split)
    accuracy: float | None = _col("float", "top-1 accuracy, fraction in [0, 1]")
    top5_accuracy: float | None = _col("float", "top-5 accuracy (top-k for k < 5 classes)")
    val_accuracy: float | None = _col(
        "float", "top-1 accuracy on the validation split (dataset option val_fraction)"
    )
    generation_accuracy: float | None = _col(
        "float",
        "vlm_prompt baselines: share of test images whose greedy free answer, normalised, "
        "names the true class",
    )
    loss: float | None = _col("float", "mean cross-entropy on the held-out split")
    train_loss: float | None = _col("float", "mean training loss of the last epoch")
    # data
    data_source: str = _col(
        "str",
        "where the decoded dataset came from: object_store | memory | process_cache | "
        "disk_cache | decoded",
        "",
    )
    data_wait_s: float | None = _col("float", "time from trial start until its data was ready, s")
    train_images: int | None = _col("int", "training images used (after subset/validation)")
    data_skipped_images: int | None = _col(
        "int",
        "images of the dataset's files that could not be decoded and were left out "
        "(dataset argument on_bad_image: skip; named in the log); 0: none",
    )
    data_device_mb: float | None = _col(
        "float", "dataset kept on the trial's CUDA device (inside its cap and peak), MiB"
    )
    # time
    train_time_s: float | None = _col(
        "float",
        "wall time of the training loop, s; one-off set-up (block profiling: "
        "ckpt_profile_s; compilation: compile_s) excluded for every strategy",
    )
    eval_time_s: float | None = _col("float", "wall time of the evaluation, s")
    throughput_img_s: float | None = _col("float", "training images/s, first step excluded")
    first_step_s: float | None = _col(
        "float",
        "from the trial's start (data, model, method) to the end of its first step, s; "
        "includes block profiling (ckpt_profile_s); energy and throughput start after it",
    )
    steps: int | None = _col("int", "optimizer steps taken")
    # memory
    peak_mem_mb: float | None = _col(
        "float",
        "training peak by the meter in mem_source, MiB (the Pareto axis): the training step "
        "only (evaluation: eval_peak_mem_mb; inference: infer_peak_mem_mb_*). CPU: "
        "accounted_peak_mb, without allocator caches, autograd's temporaries (gradients of "
        "activations in backward) and the runtime (train_rss_peak_mb has them); CUDA: "
        "cuda_max_allocated_mb (every live tensor, a resident dataset too), without the "
        "allocator's cache (cuda_max_reserved_mb) and the CUDA context (nvml_process_mb)",
    )
    mem_source: str = _col("str", "cuda_allocator | accounted", "")
    cap_kind: str = _col("str", "cuda_allocator (hard cap) | accounted (checked on CPU)", "")
    accounted_peak_mb: float | None = _col(
        "float",
        "params+grads+optimizer+activations (bytes saved for backward)+batch of a training "
        "step, any device, MiB; baselines: model + largest batch + the features held",
    )
    params_mb: float | None = _col("float", "parameters and buffers, MiB")
    grads_mb: float | None = _col("float", "gradients of trainable parameters, MiB")
    optimizer_mb: float | None = _col("float", "optimizer state, MiB")
    activations_mb: float | None = _col("float", "peak bytes saved for backward, MiB")
    batch_mb: float | None = _col("float", "one input batch on the device, MiB")
    cuda_max_allocated_mb: float | None = _col("float", "CUDA allocator peak allocated, MiB")
    cuda_max_reserved_mb: float | None = _col("float", "CUDA allocator peak reserved, MiB")
    cuda_max_requested_mb: float | None = _col(
        "float", "CUDA peak of bytes requested (before the allocator's rounding), MiB"
    )
    nvml_process_mb: float | None = _col(
        "float", "device memory NVML attributes to the trial's process (CUDA context included)"
    )
    mem_meters: str = _col("str", "meters that produced the memory figures, comma-separated", "")
    # memory per phase (workers.eval_batch, RssGuard)
    eval_batch_size_used: int | None = _col(
        "int", "images per evaluation forward, train_eval_batch_size halved to fit the budget"
    )
    eval_peak_mem_mb: float | None = _col(
        "float",
        "evaluation peak predicted at eval_batch_size_used: what stays allocated (CPU: "
        "params+grads+optimizer; CUDA: the allocator's bytes) + input + one forward's peak "
        "(CPU: live tensors; CUDA: allocator), measured on a probe batch and scaled, MiB",
    )
    inference_batch_size_used: int | None = _col(
        "int", "images of infer_*_batch: train_batch_size halved to fit the budget with the copy"
    )
    deploy_batch_size_used: int | None = _col(
        "int",
        "images of deploy_*_batch and per calibration forward, halved to fit the budget "
        "(a calibration stopped over budget anyway: its calibration_batch_size in deploy_results)",
    )
    baseline_batch_size_used: int | None = _col(
        "int",
        "baselines: images per image-encoder forward (vlm_prompt: per prompt batch), "
        "train_eval_batch_size fitted likewise",
    )
    rss_limit_mb: float | None = _col(
        "float", "CPU: resident growth at which the trial stops as over_budget (budget + margin)"
    )
    train_rss_peak_mb: float | None = _col(
        "float",
        "CPU: peak growth of the process's resident memory above its baseline after data "
        "loading, in training (sampled before every block and after every step, and the "
        "kernel's high-water mark reset per phase); counts what the accounted figures leave "
        "out (allocator caches, autograd temporaries, runtime) and memory an earlier phase "
        "freed but the process kept; not the dataset (loaded before the baseline) nor the "
        "worker's idle memory (torch, ~1.6 GiB); empty on CUDA, MiB",
    )
    eval_rss_peak_mb: float | None = _col(
        "float", "CPU: as train_rss_peak_mb, in evaluation (test and validation splits), MiB"
    )
    infer_rss_peak_mb: float | None = _col(
        "float", "CPU: as train_rss_peak_mb, in the inference-cost measurement, MiB"
    )
    deploy_rss_peak_mb: float | None = _col(
        "float", "CPU: as train_rss_peak_mb, in the deployment phase (empty: none ran), MiB"
    )
    # energy
    energy_j: float | None = _col(
        "float",
        "energy of the training loop after its first step (warm-up excluded), J; "
        "a share of the device's when energy_exclusive is false",
    )
    energy_source: str = _col(
        "str",
        "nvml_energy | nvml_power | rapl | estimated | unavailable (see energy_estimated)",
        "",
    )
    energy_window_s: float | None = _col("float", "wall time energy_j was measured over, s")
    energy_avg_w: float | None = _col("float", "energy_j / energy_window_s, W")
    energy_exclusive: bool | None = _col(
        "bool", "true: the trial held its device alone; false: energy_j is a share; empty: unknown"
    )
    energy_estimated: bool | None = _col(
        "bool", "true: energy_j is CPU time x watts_per_core, not a measurement"
    )
    energy_fallback: str = _col("str", "meters tried before energy_source, and why not used", "")
    # compute
    params_total: int | None = _col("int", "parameters of the adapted model")
    params_trainable: int | None = _col("int", "parameters with requires_grad")
    macs: int | None = _col("int", "forward multiply-accumulates per image")
    infer_latency_ms_b1: float | None = _col(
        "float", "inference latency of the adapted model (adapters merged), batch 1, ms"
    )
    infer_latency_ms_batch: float | None = _col(
        "float", "inference latency at the trial's batch size, ms"
    )
    infer_peak_mem_mb_b1: float | None = _col(
        "float", "inference peak memory (weights + input + forward peak), batch 1, MiB"
    )
    infer_peak_mem_mb_batch: float | None = _col(
        "float",
        "inference peak memory at inference_batch_size_used, MiB (CPU: live tensor storages, "
        "kernels' scratch excluded; CUDA: allocator; the trained model beside it excluded)",
    )
    infer_mem_source: str = _col("str", "cuda_allocator | live_tensors (CPU)", "")
    infer_merged: bool | None = _col(
        "bool", "true: adapters folded into the weights; false: not mergeable; empty: none"
    )
    # deployment phase (workers.deploy): the shipped variant; every variant in deploy_results
    deploy_variant: str = _col(
        "str", "deployed variant of the flat deploy_* columns: float | int8 | w8a8 | quamba2", ""
    )
    deploy_accuracy: float | None = _col(
        "float", "top-1 accuracy of the deployed variant on the test split, fraction"
    )
    deploy_latency_ms_b1: float | None = _col(
        "float", "inference latency of the deployed variant, batch 1, ms"
    )
    deploy_latency_ms_batch: float | None = _col(
        "float", "inference latency of the deployed variant at the trial's batch size, ms"
    )
    deploy_peak_mem_mb_b1: float | None = _col(
        "float",
        "inference peak memory of the deployed variant (stored weights: int8 codes + scales "
        "when quantized; + input + forward peak), batch 1, MiB",
    )
    deploy_peak_mem_mb_batch: float | None = _col(
        "float", "the same at deploy_batch_size_used, MiB"
    )
    deploy_size_mb: float | None = _col(
        "float", "size on disk of the deployed variant's safetensors file, MiB"
    )
    deploy_simulated: bool | None = _col(
        "bool", "true: quantization simulated in float (no int8 kernel): latency is not int8's"
    )
    deploy_merged: bool | None = _col(
        "bool", "true: adapters merged into the deployed weights; false: not mergeable; empty: none"
    )
    deploy_results: str = _col(
        "str",
        "JSON: variant -> accuracy, latency_ms_b1/_batch, peak_mem_mb_b1/_batch, size_mb, "
        "calibration_batch_size, simulated, file, skipped (why a variant has no figures)",
        "",
    )
    deploy_artifacts: str = _col(
        "str", "folder or URI of the exported safetensors files ('' when none were kept)", ""
    )
    checkpointed_blocks: int | None = _col("int", "blocks recomputed (wholly or selectively)")
    total_blocks: int | None = _col("int", "blocks of the backbone")
    ckpt_plan: str = _col(
        "str",
        "JSON: checkpointing mode of every block (save/pointwise/selective/recompute/"
        "compiled/matmul)",
        "",
    )
    ckpt_predicted_peak_mb: float | None = _col(
        "float", "accounted peak the checkpointing plan predicted, MiB"
    )
    ckpt_recompute_ms: float | None = _col(
        "float", "recompute time per step the plan predicted, ms"
    )
    ckpt_replans: int | None = _col("int", "re-plans after an over-budget step or an OOM")
    ckpt_profile_s: float | None = _col(
        "float", "seconds the block profile took (0: read from the profile cache; empty: none)"
    )
    ckpt_profile_cached: bool | None = _col(
        "bool", "the block profile came from the profile cache (empty: no profile)"
    )
    compile_s: float | None = _col(
        "float",
        "seconds torch.compile took (checkpointing compiled; 0: nothing compiled), "
        "excluded from train_time_s",
        0.0,
    )
    # provenance
    device: str = _col("str", "device the trial ran on", "")
    host: str = _col("str", "host name", "")
    node_id: str = _col("str", "Ray node id of the worker that ran the trial", "")
    attempt: int | None = _col(
        "int",
        "1 for a trial's first run in its sweep; n when Ray ran it n times (worker or node died)",
    )
    git_sha: str = _col("str", "commit of vramsweep that ran the trial", "")
    versions: str = _col("str", "JSON: python and package versions", "")
    started_at: str = _col("str", "UTC ISO-8601 start time", "")
    ended_at: str = _col("str", "UTC ISO-8601 end time", "")
    recorded_at: str = _col(
        "str",
        "UTC ISO-8601 time the record store committed the record (microseconds): of two "
        "records of one trial the later counts; empty before schema 8",
        "",
    )

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {list(STATUSES)}, got {self.status!r}")

    @property
    def trial_id(self) -> str:
        return self.spec.trial_id

    def to_row(self) -> dict[str, Any]:
        """One flat row in schema order."""
        row = {"trial_id": self.trial_id, "schema_version": SCHEMA_VERSION}
        row.update(_spec_columns(self.spec))
        for f in _result_fields():
            row[f.name] = getattr(self, f.name)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TrialRecord:
        values = {f.name: _none_if_nan(row.get(f.name)) for f in _result_fields()}
        values = {k: v for k, v in values.items() if v is not None}
        return cls(spec=TrialSpec.from_json(row["spec_json"]), **values)

    def to_json(self) -> str:
        return json.dumps(self.to_row(), allow_nan=False, default=str)

    @classmethod
    def from_json(cls, text: str) -> TrialRecord:
        return cls.from_row(json.loads(text))


def _none_if_nan(value: Any) -> Any:
    return None if isinstance(value, float) and value != value else value


@functools.cache
def _result_fields() -> tuple[dataclasses.Field, ...]:
    return tuple(f for f in dataclasses.fields(TrialRecord) if "arrow" in f.metadata)


_ARGS_FIELDS = (
    "backbone_args",
    "method_args",
    "checkpointing_args",
    "dataset_args",
    "baseline_args",
    "deploy",
)


_TRAIN_FIELDS = dataclasses.fields(TrainConfig)
_SPEC_FIELDS = dataclasses.fields(TrialSpec)


def _spec_columns(spec: TrialSpec) -> dict[str, Any]:
    cols: dict[str, Any] = {}
    for f in _SPEC_FIELDS:
        value = getattr(spec, f.name)
        if f.name == "train":
            cols.update({f"train_{t.name}": getattr(value, t.name) for t in _TRAIN_FIELDS})
        elif f.name in _ARGS_FIELDS:
            cols[f.name] = canonical_json(value)
        else:
            cols[f.name] = value
    cols["spec_json"] = spec.to_json()
    return cols


def _spec_schema_fields() -> list[tuple[str, pa.DataType, str]]:
    py = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}
    out = []
    for f in dataclasses.fields(TrialSpec):
        if f.name == "train":
            for t in dataclasses.fields(TrainConfig):
                out.append((f"train_{t.name}", py[type(t.default)], f"grid `train.{t.name}`"))
        elif f.name in _ARGS_FIELDS:
            out.append((f.name, pa.string(), f"JSON: resolved {f.metadata['doc']}"))
        else:
            out.append((f.name, py[type(f.default)], f.metadata["doc"]))
    out.append(("spec_json", pa.string(), "the TrialSpec as canonical JSON (round-trips)"))
    return out


def schema_fields() -> list[tuple[str, pa.DataType, str]]:
    """(column, Arrow type, description) for every column, in order."""
    head = [
        ("trial_id", pa.string(), "12 hex digits of the SHA-256 of the spec's canonical JSON"),
        ("schema_version", pa.int64(), f"version of this schema ({SCHEMA_VERSION})"),
    ]
    results = [(f.name, _ARROW[f.metadata["arrow"]], f.metadata["doc"]) for f in _result_fields()]
    return head + _spec_schema_fields() + results + train_fields()


@functools.cache
def record_schema() -> pa.Schema:
    """Every column a record file of this version has, except its argument columns
    (``method.r``...), which depend on the trial (``record_columns.with_flat_columns``)."""
    return pa.schema(
        [pa.field(n, t, metadata={"doc": d}) for n, t, d in schema_fields()],
        metadata={"vramsweep_schema_version": str(SCHEMA_VERSION)},
    )


@functools.cache
def _row_schema() -> pa.Schema:
    """``record_schema()`` without the flat columns: what ``TrialRecord.to_row`` fills."""
    schema = record_schema()
    return pa.schema([f for f in schema if not is_flat(f.name)], metadata=schema.metadata)


def describe_schema() -> str:
    """The schema as a Markdown table."""
    lines = ["| column | type | meaning |", "|---|---|---|"]
    for name, arrow_type, doc in schema_fields():
        cell = doc.replace("|", "\\|")  # a bare | would end the Markdown cell
        lines.append(f"| `{name}` | {arrow_type} | {cell} |")
    prefixes = ", ".join(f"`{p}.<key>`" for p in ARG_COLUMNS.values())
    lines.append(
        f"| {prefixes} | by value | every key of the JSON column `<prefix>_args` "
        "(nested keys joined with dots), typed: bool, int64, double (ints and floats "
        "mixed) or string (lists and mixed values as JSON); empty where the trial has none |"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- checking a record file

# Columns every record file has had since schema version 1 (DESIGN.md's collected table,
# plus what a record is rebuilt from); later columns may be missing from older files.
CORE_COLUMNS = (
    "trial_id schema_version spec_json kind status error backbone method checkpointing "
    "dataset seed budget_mb accuracy peak_mem_mb mem_source energy_j energy_source "
    "train_time_s params_total params_trainable macs"
).split()
CHECKED_COLUMNS = ("trial_id", "schema_version", "spec_json", "status", "accuracy")


class RecordFileError(ValueError):
    """A file in ``records/`` that is not the record its name says (foreign, forged, torn)."""


def check_record_file(name: str, schema: pa.Schema, table: pa.Table) -> None:
    """Raise ``RecordFileError`` unless the file ``name`` (``<trial_id>.parquet``) with
    Arrow ``schema`` is one record of this schema: every core column, each known column
    of its type (or all-null), one row whose ``trial_id`` is the file name and the hash of
    its ``spec_json``, a known ``status``, an ``ok`` finetune with an accuracy in [0, 1].
    ``table`` holds at least ``CHECKED_COLUMNS`` of the file."""
    expected = record_schema()
    missing = [c for c in CORE_COLUMNS if c not in schema.names]
    if missing:
        raise RecordFileError(f"missing columns {', '.join(missing)}")
    for f in schema:
        want = expected.field(f.name).type if f.name in expected.names else None
        if want is not None and f.type != want and f.type != pa.null():
            raise RecordFileError(f"column {f.name} is {f.type}, the schema says {want}")
    if table.num_rows != 1:
        raise RecordFileError(f"{table.num_rows} rows, a record has 1")
    row = table.select(list(CHECKED_COLUMNS)).to_pylist()[0]
    stem = name.removesuffix(".parquet")
    if row["trial_id"] != stem:
        raise RecordFileError(f"trial_id {row['trial_id']!r} is not its file name {stem!r}")
    try:
        spec = TrialSpec.from_json(row["spec_json"])
    except Exception as exc:  # noqa: BLE001 - any malformed spec is the same finding
        raise RecordFileError(f"spec_json is not a trial spec ({exc})") from None
    if spec.trial_id != stem:
        raise RecordFileError(f"its spec hashes to {spec.trial_id}, not to {stem}")
    if row["status"] not in STATUSES:
        raise RecordFileError(f"status {row['status']!r} is none of {', '.join(STATUSES)}")
    accuracy = _none_if_nan(row["accuracy"])
    in_range = accuracy is not None and 0 <= accuracy <= 1
    if row["status"] == "ok" and spec.kind == "finetune" and not in_range:
        raise RecordFileError(f"status ok without an accuracy in [0, 1] ({accuracy})")


def recorded_ids(folder: str | os.PathLike[str], retry_failed: bool = False) -> set[str]:
    """Trial ids with a readable record in the local records folder ``folder``, read only
    (a dry run: a file that does not read counts as not recorded and stays where it is);
    with ``retry_failed``, trials whose newest record is ``failed`` do not count."""
    newest: dict[str, tuple[str, str]] = {}  # trial id -> (recorded_at, status)
    folder = Path(folder)
    for path in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        if path.name.startswith("."):
            continue
        try:
            names = pq.read_schema(path).names
            columns = [c for c in ("trial_id", "status", "recorded_at") if c in names]
            rows = pq.read_table(path, columns=columns).to_pylist()
        except (OSError, ValueError, KeyError, pa.ArrowException):
            continue
        if not compaction.is_part(path.name) and [r["trial_id"] for r in rows] != [path.stem]:
            continue
        for row in rows:
            stamp = row.get("recorded_at") or ""
            if stamp >= newest.get(row["trial_id"], ("", ""))[0]:
                newest[row["trial_id"]] = (stamp, row["status"])
    return {i for i, (_, status) in newest.items() if not (retry_failed and status == "failed")}


# ---------------------------------------------------------------- store


class WriteError(Exception):
    """A file of the output could not be written (a read-only or full disk, a folder in
    the way): the message names the file and the operating system's reason."""

    def __init__(self, path: str, error: Exception) -> None:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        super().__init__(f"cannot write {path}: {reason}")
        self.path = path


def write_file(target: str, data: bytes, fs: Any = None) -> str:
    """Write ``data`` to ``target`` so that no reader ever sees half of it: a local path
    (temporary file, fsync, rename, fsync of the folder) or a URI / a path in the pyarrow
    file system ``fs`` (an object store's put is atomic; file:// URIs, for tests, are
    not). Returns ``target``."""
    if fs is None and "://" in target:
        import pyarrow.fs as pafs

        fs, target_path = pafs.FileSystem.from_uri(target)
    else:
        target_path = target
    if fs is not None:
        fs.create_dir(target_path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(target_path) as out:
            out.write(data)
        return target
    dest = Path(target)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        # a folder that became read-only fails the cleanup too: the first error is the news
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)
    return target


class RecordStore:
    """The records of one sweep output folder: atomic writes, listing, collection.

    ``output`` is a local folder (NFS included) or a URI that pyarrow understands
    (``s3://bucket/prefix``, ``gs://...``); object stores make each put atomic.
    ``compact_every``: after this many files written, small files are merged
    (``orchestrator.compaction``; 0: never by itself). Only the output's owner writes.

    Example:
        >>> store = RecordStore("results/smoke")  # doctest: +SKIP
        >>> store.write_many(records)  # one part, one fsync  # doctest: +SKIP
        >>> store.collect()[["trial_id", "method.r", "train.lr", "accuracy"]]  # doctest: +SKIP
    """

    def __init__(
        self, output: str | os.PathLike[str], *, compact_every: int = compaction.FANOUT
    ) -> None:
        import pyarrow.fs as pafs

        self.output = str(output)
        self.is_uri = "://" in self.output
        self.compact_every = compact_every
        self._written = 0  # files written since the last compaction
        # small files this store wrote, as written: a compaction merges them unread
        self._recent: dict[str, tuple[StoredFile, pa.Table]] = {}
        # (file name, where it was moved, why) of every unreadable record found
        self.quarantined: list[tuple[str, str, str]] = []
        if self.is_uri:
            self._fs, self._root = pafs.FileSystem.from_uri(self.output)
        else:
            self._fs = pafs.LocalFileSystem()
            self._root = str(Path(self.output).resolve())
            Path(self.records_dir).mkdir(parents=True, exist_ok=True)

    @property
    def records_dir(self) -> str:
        return f"{self._root}/records"

    def folder(self, name: str) -> str:
        """Absolute path (or URI) of folder ``name`` beside ``records/``."""
        return f"{self.output.rstrip('/')}/{name}" if self.is_uri else f"{self._root}/{name}"

    def path_of(self, trial_id: str) -> str:
        return f"{self.records_dir}/{trial_id}.parquet"

    def inner(self, name: str) -> str:
        """Path of ``name`` beside ``records/`` in the store's file system (no scheme)."""
        return f"{self._root}/{name}"

    # ------------------------------------------------------------ writing

    def write(self, record: TrialRecord) -> str:
        """Write ``record`` atomically as ``<trial_id>.parquet`` (durable on return); an
        earlier record of the same trial is superseded."""
        path = self.path_of(record.trial_id)
        self._commit(path, [record])
        return path

    def write_many(self, records: Sequence[TrialRecord]) -> str | None:
        """Group commit: ``records`` (trials that finished together) in one part file,
        one fsync, durable on return. Returns its path (None for no records)."""
        unique = list({r.trial_id: r for r in records}.values())  # the last of a trial
        if len(unique) <= 1:
            return self.write(unique[0]) if unique else None
        path = f"{self.records_dir}/{compaction.part_name(len(unique))}"
        self._commit(path, unique)
        return path

    def _commit(self, path: str, records: list[TrialRecord]) -> None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        for record in records:
            record.recorded_at = stamp
        table = pa.Table.from_pylist([r.to_row() for r in records], schema=_row_schema())
        self.write_table_at(path, with_flat_columns(table))
        self._written += 1
        if self.compact_every and self._written >= self.compact_every:
            self.compact()

    def compact(self, *, everything: bool = False) -> int:
        """Merge small record files into parts (``orchestrator.compaction.compact``);
        returns the parts written. A failure is logged: every record is still there."""
        self._written = 0
        try:
            return compaction.compact(
                self, everything=everything, fanout=self.compact_every or compaction.FANOUT
            )
        except (OSError, WriteError, pa.ArrowException) as exc:
            log.error("compacting %s failed (%s); its records are as they were", self.output, exc)
            return 0

    def write_table_at(self, path: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes_at(path, buf.getvalue())
        if table.num_rows < RECENT_ROWS:
            stored = self.stat(path)
            if stored is not None:
                self._recent[path] = (stored, table)

    def _written_or_read(self, stored: StoredFile) -> pa.Table | None:
        """The table this store wrote as ``stored`` if the file is still that one, else
        the file's checked rows (``_read_checked``)."""
        held = self._recent.get(stored.path)
        if held is not None and (held[0].size, held[0].mtime_ns) == (stored.size, stored.mtime_ns):
            return held[1]
        return self._read_checked(stored.path)

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write a file (report, table) under the output folder, atomically."""
        path = f"{self._root}/{relpath}"
        self.write_bytes_at(path, data)
        return path

    def write_bytes_at(self, path: str, data: bytes) -> None:
        try:
            write_file(path, data, self._fs if self.is_uri else None)
        except OSError as exc:
            raise WriteError(path, exc) from exc

    # ------------------------------------------------------------ files

    def listing(self) -> list[StoredFile]:
        """Finished record files, sorted by name (temporary files of interrupted writes,
        named ``.*``, are ignored)."""
        return [f for f in self._list(self.records_dir) if f.name.endswith(".parquet")]

    def record_paths(self) -> list[str]:
        return [f.path for f in self.listing()]

    def _list(self, folder: str) -> list[StoredFile]:
        import pyarrow.fs as pafs

        infos = self._fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        files = [
            StoredFile(i.path, i.size, i.mtime_ns or 0)
            for i in infos
            if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_"))
        ]
        return sorted(files, key=lambda f: f.name)

    def list_folder(self, folder: str, suffix: str) -> list[str]:
        return [f.path for f in self._list(folder) if f.name.endswith(suffix)]

    def stat(self, path: str) -> StoredFile | None:
        import pyarrow.fs as pafs

        info = self._fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return None
        return StoredFile(info.path, info.size, info.mtime_ns or 0)

    def delete(self, path: str) -> None:
        self._recent.pop(path, None)
        with contextlib.suppress(FileNotFoundError):
            self._fs.delete_file(path)

    def read_bytes(self, path: str) -> bytes:
        with self._fs.open_input_stream(path) as stream:
            return stream.read()

    def sync_records_dir(self) -> None:
        """Make deletions and renames in ``records/`` durable (local folders)."""
        if self.is_uri:
            return
        dir_fd = os.open(self.records_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # ------------------------------------------------------------ reading

    def _read_checked(self, path: str, columns: list[str] | None = None) -> pa.Table | None:
        """The checked rows of one file (``columns`` only, or all), or None when it is
        not a valid record file: then it is quarantined. ``_Vanished`` when it went away
        (a compaction merged it) between the listing and the read."""
        name = path.rsplit("/", 1)[-1]
        try:
            parquet = pq.ParquetFile(path, filesystem=self._fs)
            schema = parquet.schema_arrow
            if compaction.is_part(name):
                wanted = PART_CHECKED if columns is not None else None
                table = _read(parquet, wanted, columns)
                check_part_file(name, schema, table)
            else:
                wanted = list(CHECKED_COLUMNS) if columns is not None else None
                table = _read(parquet, wanted, columns)
                check_record_file(name, schema, table)
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            if self.stat(path) is None:
                raise _Vanished(path) from exc
            self._quarantine(path, exc)
            return None
        return table

    def _read_all(self, columns: list[str] | None = None) -> list[pa.Table]:
        """Every valid file's rows, each with a ``_source`` rank (later wins a tie)."""
        for attempt in range(RESCANS):
            try:
                tables = []
                for rank, f in enumerate(self.listing()):
                    table = self._read_checked(f.path, columns)
                    if table is not None:
                        source = pa.array(np.full(table.num_rows, rank, dtype=np.int64))
                        tables.append(table.append_column("_source", source))
                return tables
            except _Vanished as gone:
                log.debug("%s went while it was read (attempt %d): listing again", gone, attempt)
        raise OSError(f"{self.records_dir}: files keep vanishing while they are read")

    def existing_ids(self) -> set[str]:
        """Trial ids that have a valid record (``check_record_file`` / ``check_part_file``
        on the footer and the checked columns). Any other file (unreadable, foreign,
        forged) is quarantined, so its trial runs again. An interrupted compaction is
        finished or rolled back first."""
        compaction.recover(self)
        ids: set[str] = set()
        for table in self._read_all(columns=list(CHECKED_COLUMNS)):
            ids.update(table["trial_id"].to_pylist())
        return ids

    @property
    def quarantine_dir(self) -> str:
        return f"{self._root}/{QUARANTINE}"

    def _quarantine(self, path: str, reason: Exception) -> None:
        """Move an unreadable record out of ``records/`` (kept, named, never dropped)."""
        name = f"{Path(path).name}.{time.strftime('%Y%m%d-%H%M%S')}.{uuid.uuid4().hex[:6]}"
        target = f"{self.quarantine_dir}/{name}"
        self._fs.create_dir(self.quarantine_dir, recursive=True)
        try:
            self._fs.move(path, target)
        except FileNotFoundError:  # another reader moved it first
            return
        self.quarantined.append((Path(path).name, target, f"{type(reason).__name__}: {reason}"))
        log.error("record %s is unreadable (%s): moved to %s", path, reason, target)

    def combine(self, files: Sequence[StoredFile] | None = None) -> pa.Table | None:
        """The records of ``files`` (default: all) as one table in the file layout: the
        newest row of each trial, sorted by trial id, every column of this schema, the
        flat columns derived again. None when a file vanished while it was read."""
        if files is None:
            tables = self._read_all()
        else:
            try:
                tables = [self._written_or_read(f) for f in files]
            except _Vanished:
                return None
            tables = [
                t.append_column("_source", pa.array(np.full(t.num_rows, i, dtype=np.int64)))
                for i, t in enumerate(tables)
                if t is not None
            ]
        schema = record_schema()
        if not tables:
            return with_flat_columns(schema.empty_table())
        tables = [t.drop_columns([c for c in t.column_names if is_flat(c)]) for t in tables]
        table = pa.concat_tables(tables, promote_options="permissive")
        if "recorded_at" not in table.column_names:
            table = table.append_column("recorded_at", pa.nulls(table.num_rows, pa.string()))
        table = compaction.newest_per_trial(table)
        base = _row_schema()
        for f in base:  # columns newer than every file: empty, so readers find them all
            if f.name not in table.column_names:
                table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        extra = [c for c in table.column_names if c not in base.names]  # a newer version's
        table = table.select(base.names + extra)
        schema = pa.schema([_doc_field(f, base) for f in table.schema], metadata=base.metadata)
        table = pa.Table.from_arrays(table.columns, schema=schema)
        return with_flat_columns(table)

    def read_table(self) -> pa.Table:
        """All records as one Arrow table, one row per trial sorted by trial id, with the
        columns' documentation in its schema; unreadable files are quarantined (see
        ``quarantined``) and their trials count as not run."""
        table = self.combine()
        assert table is not None  # reading everything lists again when a file vanishes
        return table

    def collect(self) -> Any:
        """All records as a pandas DataFrame, one row per trial, sorted by trial id."""
        return self.read_table().to_pandas()

    def read_record(self, trial_id: str) -> TrialRecord:
        """The newest record of ``trial_id`` (``KeyError`` when it has none)."""
        import pyarrow.dataset as pads

        rows = []
        for attempt in range(RESCANS):
            try:
                rows = []
                for f in self.listing():
                    if compaction.is_part(f.name) or f.name == f"{trial_id}.parquet":
                        rows += (
                            pads.dataset(f.path, filesystem=self._fs)
                            .to_table(filter=pads.field("trial_id") == trial_id)
                            .to_pylist()
                        )
                break
            except FileNotFoundError:
                log.debug("a record file went while it was read (attempt %d)", attempt)
        if not rows:
            raise KeyError(f"no record of trial {trial_id} in {self.records_dir}")
        return TrialRecord.from_row(max(rows, key=lambda r: r.get("recorded_at") or ""))


RECENT_ROWS = compaction.FANOUT**2  # files this small stay in memory until compacted
RESCANS = 20  # listings of records/ a reader tries while compactions replace files
PART_CHECKED = [*CHECKED_COLUMNS, "kind", "recorded_at"]


class _Vanished(Exception):
    """A listed record file was gone when it was read."""


def _read(parquet: pq.ParquetFile, wanted: list[str] | None, columns: list[str] | None) -> pa.Table:
    if wanted is None:
        return parquet.read()
    names = parquet.schema_arrow.names
    return parquet.read(columns=[c for c in dict.fromkeys(wanted + (columns or [])) if c in names])


def _doc_field(f: pa.Field, schema: pa.Schema) -> pa.Field:
    """``f`` with the documentation this version gives its column."""
    if f.name in schema.names:
        return f.with_metadata(schema.field(f.name).metadata)
    return f


def check_part_file(name: str, schema: pa.Schema, table: pa.Table) -> None:
    """Raise ``RecordFileError`` unless the part ``name`` with Arrow ``schema`` holds
    records of this schema (``compaction.check_part_rows``); ``table`` holds at least
    its ``PART_CHECKED`` columns."""
    expected = record_schema()
    missing = [c for c in CORE_COLUMNS if c not in schema.names]
    if missing:
        raise RecordFileError(f"missing columns {', '.join(missing)}")
    for f in schema:
        want = expected.field(f.name).type if f.name in expected.names else None
        if want is not None and f.type != want and f.type != pa.null():
            raise RecordFileError(f"column {f.name} is {f.type}, the schema says {want}")
    problem = compaction.check_part_rows(table, STATUSES)
    if problem is not None:
        raise RecordFileError(f"part {name}: {problem}")
