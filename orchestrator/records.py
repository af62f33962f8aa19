"""TrialRecord, its Arrow schema, and the record store: the only module that writes records.

One record per trial, one Parquet file per record under ``OUTPUT/records/``,
written atomically (temporary file, fsync, rename), so a crash never leaves half a
record and a resumed sweep skips every trial id that already has one. Failures are
records too (status ``failed``, ``oom``, ``over_budget``).

The schema is defined once, here: the columns of the spec (flattened), then the
fields of ``TrialRecord`` in declaration order, each with a unit in its name and a
doc string (``describe_schema()`` prints the table that the README shows). Its
version, ``SCHEMA_VERSION`` (column ``schema_version``, Parquet metadata), is bumped
whenever columns change; version 4 added the deployment phase: the spec's ``deploy``
column and the ``deploy_*`` columns; version 5 ``data_skipped_images``; version 6
``ckpt_profile_s`` and ``ckpt_profile_cached``; version 7 the memory of every phase
(``eval_batch_size_used``, ``eval_peak_mem_mb``, ``rss_limit_mb``, ``*_rss_peak_mb``).
Older record files still collect (their missing columns are empty).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.spec import TrainConfig, TrialSpec, canonical_json

log = logging.getLogger(__name__)

# 2: checkpointing plan columns; 3: dataset options (data source, wait, validation
# accuracy); 4: the deployment phase (spec column `deploy`, deploy_* columns);
# 5: data_skipped_images; 6: ckpt_profile_s, ckpt_profile_cached (train_time_s no
# longer includes block profiling); 7: memory per phase (eval_batch_size_used,
# eval_peak_mem_mb, rss_limit_mb, *_rss_peak_mb).
SCHEMA_VERSION = 7
QUARANTINE = "quarantine"  # folder beside records/ that unreadable record files move to
STATUSES = ("ok", "oom", "over_budget", "failed", "skipped")

_ARROW = {"str": pa.string(), "float": pa.float64(), "int": pa.int64(), "bool": pa.bool_()}


def _col(kind: str, doc: str, default: Any = None) -> Any:
    return field(default=default, metadata={"arrow": kind, "doc": doc})


@dataclass
class TrialRecord:
    """The outcome of one trial: its spec plus status, metrics, costs and provenance."""

    spec: TrialSpec
    status: str = _col("str", "ok | oom | over_budget | failed | skipped", "failed")
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
        "ckpt_profile_s) excluded for every strategy",
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
        "only; evaluation in eval_peak_mem_mb, the process's resident memory in *_rss_peak_mb",
    )
    mem_source: str = _col("str", "cuda_allocator | accounted", "")
    cap_kind: str = _col("str", "cuda_allocator (hard cap) | accounted (checked on CPU)", "")
    accounted_peak_mb: float | None = _col("float", "params+grads+optimizer+activations+batch")
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
    rss_limit_mb: float | None = _col(
        "float", "CPU: resident growth at which the trial stops as over_budget (budget + margin)"
    )
    train_rss_peak_mb: float | None = _col(
        "float",
        "CPU: peak growth of the process's resident memory above its baseline after data "
        "loading, in training (sampled before every block and after every step, and the "
        "kernel's high-water mark reset per phase); counts what the accounted figures leave "
        "out (allocator caches, autograd temporaries, runtime); empty on CUDA, MiB",
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
        "float", "inference peak memory at the trial's batch size, MiB"
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
        "float", "the same at the trial's batch size, MiB"
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
        "simulated, file, skipped (why a variant has no figures)",
        "",
    )
    deploy_artifacts: str = _col(
        "str", "folder or URI of the exported safetensors files ('' when none were kept)", ""
    )
    checkpointed_blocks: int | None = _col("int", "blocks recomputed (wholly or selectively)")
    total_blocks: int | None = _col("int", "blocks of the backbone")
    ckpt_plan: str = _col(
        "str", "JSON: checkpointing mode of every block (save/selective/recompute)", ""
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


def _result_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrialRecord) if "arrow" in f.metadata]


_ARGS_FIELDS = (
    "backbone_args",
    "method_args",
    "checkpointing_args",
    "dataset_args",
    "baseline_args",
    "deploy",
)


def _spec_columns(spec: TrialSpec) -> dict[str, Any]:
    cols: dict[str, Any] = {}
    for f in dataclasses.fields(TrialSpec):
        value = getattr(spec, f.name)
        if f.name == "train":
            cols.update({f"train_{k}": v for k, v in dataclasses.asdict(value).items()})
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
    return head + _spec_schema_fields() + results


def record_schema() -> pa.Schema:
    return pa.schema(
        [pa.field(n, t, metadata={"doc": d}) for n, t, d in schema_fields()],
        metadata={"vramsweep_schema_version": str(SCHEMA_VERSION)},
    )


def describe_schema() -> str:
    """The schema as a Markdown table."""
    lines = ["| column | type | meaning |", "|---|---|---|"]
    for name, arrow_type, doc in schema_fields():
        cell = doc.replace("|", "\\|")  # a bare | would end the Markdown cell
        lines.append(f"| `{name}` | {arrow_type} | {cell} |")
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
    """

    def __init__(self, output: str | os.PathLike[str]) -> None:
        self.output = str(output)
        self.is_uri = "://" in self.output
        # (file name, where it was moved, why) of every unreadable record found
        self.quarantined: list[tuple[str, str, str]] = []
        if self.is_uri:
            import pyarrow.fs as pafs

            self._fs, self._root = pafs.FileSystem.from_uri(self.output)
        else:
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

    def write(self, record: TrialRecord) -> str:
        """Write ``record`` atomically; an existing record of the same trial is replaced."""
        table = pa.Table.from_pylist([record.to_row()], schema=record_schema())
        buf = io.BytesIO()
        pq.write_table(table, buf)
        path = self.path_of(record.trial_id)
        self.write_bytes_at(path, buf.getvalue())
        return path

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

    def record_paths(self) -> list[str]:
        """Finished record files (temporary files of interrupted writes are ignored)."""
        if self.is_uri:
            import pyarrow.fs as pafs

            infos = self._fs.get_file_info(
                pafs.FileSelector(self.records_dir, allow_not_found=True)
            )
            names = [i.path for i in infos if i.type == pafs.FileType.File]
        else:
            names = [str(p) for p in Path(self.records_dir).glob("*.parquet") if p.is_file()]
        return sorted(n for n in names if not Path(n).name.startswith("."))

    def existing_ids(self) -> set[str]:
        """Trial ids that have a valid record (``check_record_file`` on the footer and the
        checked columns). Any other file (unreadable, foreign, forged) is quarantined, so
        its trial runs again."""
        ids = set()
        for path in self.record_paths():
            try:
                parquet = pq.ParquetFile(path, filesystem=self._fs if self.is_uri else None)
                schema = parquet.schema_arrow
                checked = [c for c in CHECKED_COLUMNS if c in schema.names]
                check_record_file(Path(path).name, schema, parquet.read(columns=checked))
            except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
                self._quarantine(path, exc)
                continue
            ids.add(Path(path).stem)
        return ids

    @property
    def quarantine_dir(self) -> str:
        return f"{self._root}/{QUARANTINE}"

    def _quarantine(self, path: str, reason: Exception) -> None:
        """Move an unreadable record out of ``records/`` (kept, named, never dropped)."""
        name = f"{Path(path).name}.{time.strftime('%Y%m%d-%H%M%S')}.{uuid.uuid4().hex[:6]}"
        target = f"{self.quarantine_dir}/{name}"
        if self.is_uri:
            self._fs.create_dir(self.quarantine_dir, recursive=True)
            self._fs.move(path, target)
        else:
            Path(self.quarantine_dir).mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        self.quarantined.append((Path(path).name, target, f"{type(reason).__name__}: {reason}"))
        log.error("record %s is unreadable (%s): moved to %s", path, reason, target)

    def read_table(self) -> pa.Table:
        """All records as one Arrow table; unreadable files are quarantined (see
        ``quarantined``) and their trials count as not run."""
        tables = []
        for path in self.record_paths():
            try:
                table = pq.read_table(path, filesystem=self._fs if self.is_uri else None)
                check_record_file(Path(path).name, table.schema, table)
            except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
                self._quarantine(path, exc)
                continue
            tables.append(table)
        schema = record_schema()
        if not tables:
            return schema.empty_table()
        table = pa.concat_tables(tables, promote_options="permissive")
        for f in schema:  # columns newer than every file: empty, so readers find them all
            if f.name not in table.column_names:
                table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        return table.select(schema.names)

    def collect(self) -> Any:
        """All records as a pandas DataFrame, one row per trial, sorted by trial id."""
        frame = self.read_table().to_pandas()
        return frame.sort_values("trial_id", ignore_index=True)

    def read_record(self, trial_id: str) -> TrialRecord:
        path = self.path_of(trial_id)
        table = pq.read_table(path, filesystem=self._fs) if self.is_uri else pq.read_table(path)
        return TrialRecord.from_row(table.to_pylist()[0])
