"""Hostile grids never take the tool down (issue 17): each file of the corpus below exits
2 from both `orchestrate validate` and `orchestrate run --dry-run`, with one line that
names the file, the field and the value (never a traceback, never a 5 MB line), and
writes nothing: no output folder, no records, no file changed.

The corpus covers every top-level field with a wrong type, out-of-range and huge
values, NaN and infinities, YAML aliases and duplicate keys, bytes that are not UTF-8,
tabs, paths that escape, and URIs that cannot be written to. Most cases run in-process
through ``orchestrator.cli.main``; a few through the real ``orchestrate`` process.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from orchestrator import cli, outputs
from orchestrator.cli import main
from orchestrator.expansion import expand
from orchestrator.grid import MAX_TRIALS, load_grid
from orchestrator.records import record_schema
from orchestrator.spec import TrainConfig, TrialSpec
from tests.orchestrator.test_grid import RawText, const, set_

ORCHESTRATE = str(Path(sys.executable).parent / "orchestrate")
MAX_LINE = 3000  # an error line stays readable whatever the value was


class RawBytes(bytes):
    """File content written as these bytes."""


def text(content: str) -> Callable[[dict[str, Any]], RawText]:
    """A grid file with this text, the tiny grid's output folder filled in."""
    return lambda grid: RawText(content.replace("OUT", grid["output"]))


def grid_yaml(extra: str) -> Callable[[dict[str, Any]], RawText]:
    """The tiny grid written by hand (keys and lines as YAML has them), plus ``extra``."""
    return text(
        "name: tiny\noutput: OUT\nbudget_mb: 2048\nseeds: [0]\n"
        "datasets: {synthetic: {num_classes: 4, images_per_class: 24, image_size: 16}}\n"
        "backbones: {vit_test: {img_size: 16}}\n" + extra
    )


def with_method_args(args: str) -> Callable[[dict[str, Any]], RawText]:
    return grid_yaml(f"methods:\n  lora: {args}\n")


def billion_laughs(indent: str) -> str:
    """Six levels of ten aliases each: a million values from a few lines."""
    lines = [f"{indent}a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcde", "bcdef", strict=True):
        lines.append(f"{indent}{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    return "\n".join(lines) + "\n"


# (mutation of the tiny grid, field as printed after the file name, fragments that the
# message must hold: the value, or what stands for it)
HOSTILE: list[Any] = [
    # ---- a wrong type in every top-level field
    pytest.param(set_("name", 42), "name", ("got 42",), id="type-name"),
    pytest.param(set_("output", 5), "output", ("got 5",), id="type-output"),
    pytest.param(set_("output", {"a": 1}), "output", ("{'a': 1}",), id="type-output-map"),
    pytest.param(set_("budget_mb", {"a": 1}), "budget_mb", ("{'a': 1}",), id="type-budget"),
    pytest.param(set_("seeds", "zero"), "seeds", ("'zero'",), id="type-seeds"),
    pytest.param(set_("datasets", 7), "datasets", ("got 7",), id="type-datasets"),
    pytest.param(set_("backbones", 3.5), "backbones", ("got 3.5",), id="type-backbones"),
    pytest.param(set_("methods", True), "methods", ("got True",), id="type-methods"),
    pytest.param(set_("checkpointing", 1), "checkpointing", ("got 1",), id="type-checkpointing"),
    pytest.param(set_("train", "fast"), "train", ("'fast'",), id="type-train"),
    pytest.param(set_("exclude", "all"), "exclude", ("'all'",), id="type-exclude"),
    pytest.param(
        set_("baselines", {"name": "zeroshot"}), "baselines", ("'zeroshot'",), id="type-baselines"
    ),
    pytest.param(set_("resources", 4), "resources", ("got 4",), id="type-resources"),
    pytest.param(set_("energy", ["x"]), "energy", ("['x']",), id="type-energy"),
    pytest.param(set_("search", "yes"), "search", ("'yes'",), id="type-search"),
    pytest.param(set_("deploy", 3), "deploy", ("got 3",), id="type-deploy"),
    pytest.param(set_("plugins", 5), "plugins", ("got 5",), id="type-plugins"),
    pytest.param(set_("train", {1: 2}), "train", ("unknown field '1'",), id="type-train-key"),
    pytest.param(
        set_("methods", {"lora": {1: 2, "x": 3}}),
        "methods.lora",
        ("unknown argument(s) ['1', 'x']",),
        id="type-mixed-argument-keys",
    ),
    # ---- out of range: what the records hold, and sane sizes
    pytest.param(set_("seeds", [2**32]), "seeds", ("4294967296",), id="seed-past-numpy"),
    pytest.param(set_("seeds", [2**64]), "seeds", ("18446744073709551616",), id="seed-past-int64"),
    pytest.param(set_("budget_mb", 1e8), "budget_mb", ("at most", "100000000.0"), id="budget-huge"),
    pytest.param(
        set_("train.epochs", 10**6), "train", ("epochs must be at most", "1000000"), id="epochs"
    ),
    pytest.param(
        set_("train.batch_size", 2**40), "train", ("batch_size", str(2**40)), id="batch-size"
    ),
    pytest.param(
        set_("train.max_steps", 2**63), "train.max_steps", ("64 bits", str(2**63)), id="max-steps"
    ),
    pytest.param(
        set_("resources.cpus_per_trial", 10**6),
        "resources",
        ("cpus_per_trial must be at most", "1000000"),
        id="cpus-per-trial",
    ),
    pytest.param(
        set_("resources.gpus_per_trial", 1000),
        "resources",
        ("gpus_per_trial", "1000"),
        id="gpus-per-trial",
    ),
    pytest.param(
        set_("backbones", {"vit_test": {"img_size": 100_000}}),
        "backbones.vit_test",
        ("img_size", "100000"),
        id="img-size",
    ),
    pytest.param(
        set_("datasets.synthetic.image_size", 100_000),
        "datasets.synthetic",
        ("image_size must be at most 4096", "100000"),
        id="image-size",
    ),
    pytest.param(
        set_("datasets", {"digits": {"image_size": 50_000}}),
        "datasets.digits",
        ("image_size must be at most 4096", "50000"),
        id="digits-image-size",
    ),
    pytest.param(
        set_("datasets.synthetic.images_per_class", 10**9),
        "datasets.synthetic",
        ("images_per_class", "1000000000"),
        id="synthetic-images",
    ),
    pytest.param(
        set_("methods", {"lora": {"r": 2**70}}),
        "methods.lora",
        ("'r' must fit in 64 bits", str(2**70)),
        id="lora-rank-past-int64",
    ),
    pytest.param(
        set_("search", {"seed": 2**40}), "search", ("seed must be", str(2**40)), id="search-seed"
    ),
    pytest.param(
        set_("budget_mb", 2**1100), "budget_mb", ("> 0", str(2**1100)[:50]), id="budget-past-float"
    ),
    pytest.param(
        set_("train.lr", 2**60), "train.lr", ("float64 column holds", str(2**60)), id="lr-int"
    ),
    pytest.param(
        set_("search", {"objectives": [[]]}),
        "search.objectives",
        ("unknown objective []",),
        id="search-objective-a-list",
    ),
    pytest.param(
        set_("backbones", {"vit_test": {"model_args": {"depth": datetime.date(2020, 1, 1)}}}),
        "backbones.vit_test",
        ("must be a string, number, boolean, null, list or mapping", "date"),
        id="model-args-date",
    ),
    pytest.param(
        set_("methods", {"lora": {"target": {"x", "y"}}}),
        "methods.lora",
        ("argument 'target' must be str", "'x'"),
        id="argument-a-yaml-set",
    ),
    # ---- NaN and infinities, named by their field
    pytest.param(set_("budget_mb", float("nan")), "budget_mb", ("nan",), id="nan-budget"),
    pytest.param(set_("train.lr", float("inf")), "train.lr", ("inf",), id="inf-lr"),
    pytest.param(set_("train.lr", "nan"), "train.lr", ("nan",), id="nan-lr-as-text"),
    pytest.param(
        set_("train.warmup_epochs", float("nan")), "train.warmup_epochs", ("nan",), id="nan-warmup"
    ),
    pytest.param(
        set_("resources.gpus_per_trial", float("inf")),
        "resources.gpus_per_trial",
        ("inf",),
        id="inf-gpus",
    ),
    pytest.param(
        set_("energy.watts_per_core", float("inf")),
        "energy.watts_per_core",
        ("inf",),
        id="inf-watts",
    ),
    pytest.param(
        set_("checkpointing", {"adaptive": {"margin_mb": float("inf")}}),
        "checkpointing.adaptive",
        ("'margin_mb' must be a finite number", "inf"),
        id="inf-margin",
    ),
    pytest.param(
        set_("methods", {"lora": {"alpha": float("nan")}}),
        "methods.lora",
        ("'alpha' must be a finite number", "nan"),
        id="nan-lora-alpha",
    ),
    pytest.param(
        set_("datasets.synthetic.crop_ratio", [0.5, float("inf")]),
        "datasets.synthetic",
        ("'crop_ratio' must be a finite number", "inf"),
        id="inf-crop-ratio",
    ),
    pytest.param(
        set_("backbones", {"vit_test": {"model_args": {"mlp_ratio": float("nan")}}}),
        "backbones.vit_test",
        ("['mlp_ratio'] must be a finite number", "nan"),
        id="nan-model-args",
    ),
    pytest.param(
        set_("deploy", {"percentile": float("nan")}), "deploy.percentile", ("nan",), id="nan-deploy"
    ),
    pytest.param(
        set_("search", {"timeout_s": float("inf")}),
        "search",
        ("timeout_s", "inf"),
        id="inf-timeout",
    ),
    pytest.param(
        set_("search", {"constraints": {"energy_j": float("inf")}}),
        "search.constraints.energy_j",
        ("inf",),
        id="inf-constraint",
    ),
    pytest.param(
        set_("baselines", [{"name": "dinov2_knn", "backbone": "/nowhere", "temperature": -1e999}]),
        "baselines[0]",
        ("'temperature' must be a finite number", "-inf"),
        id="inf-baseline-argument",
    ),
    # ---- huge values: refused, and never echoed whole
    pytest.param(
        set_("name", "a" * 500_000), "name", ("at most 100 characters", "500000"), id="huge-name"
    ),
    pytest.param(set_("output", "o" * 500_000), "output", ("not a usable path",), id="huge-output"),
    pytest.param(
        set_("methods", {"lora": {"target": "x" * 100_000}}),
        "methods.lora",
        ("at most 4096 characters", "100000 characters"),
        id="huge-argument",
    ),
    pytest.param(
        set_("methods", {"lora": {"k" * 300_000: 1}}),
        "methods.lora",
        ("unknown argument(s)", "more characters"),
        id="huge-argument-key",
    ),
    pytest.param(
        const(RawText("name: tiny\n# " + "x" * (1 << 21) + "\n")),
        "file",
        ("larger than 1048576 bytes",),
        id="huge-file",
    ),
    # ---- aliases
    pytest.param(
        grid_yaml("methods:\n  lora:\n" + billion_laughs("    ")),
        "file",
        ("more than 100000 values once its aliases are expanded",),
        id="alias-bomb",
    ),
    pytest.param(
        grid_yaml("methods:\n  lora: &x {r: [1, *x]}\n"),
        "file",
        ("alias *x refers to a value that contains it",),
        id="alias-recursive",
    ),
    pytest.param(
        grid_yaml("methods:\n  full: " + "[" * 1000 + "]" * 1000 + "\n"),
        "file",
        ("nested deeper than 64 levels",),
        id="nesting-deep",
    ),
    # ---- duplicate keys, named with both lines
    pytest.param(
        grid_yaml("methods: {full: {}}\ntrain: {epochs: 1}\ntrain: {epochs: 2}\n"),
        "train",
        ("key 'train' appears twice (lines 8 and 9)",),
        id="duplicate-top-level-key",
    ),
    pytest.param(
        grid_yaml("methods:\n  lora: {r: 4}\n  full: {}\n  lora: {r: 8}\n"),
        "lora",
        ("key 'lora' appears twice (lines 8 and 10)",),
        id="duplicate-method",
    ),
    pytest.param(
        with_method_args("{r: 4, r: 8}"), "r", ("key 'r' appears twice",), id="duplicate-argument"
    ),
    # ---- bytes, tabs and YAML that is not a grid
    pytest.param(
        const(RawBytes("name: tiny\n".encode("utf-16"))),
        "file",
        ("not UTF-8 text (byte 0)",),
        id="utf16",
    ),
    pytest.param(
        const(RawBytes(b"name: caf\xe9\n")), "file", ("not UTF-8 text (byte 9)",), id="latin1"
    ),
    pytest.param(
        const(RawBytes(b"name: tiny\x00\n")),
        "file",
        ("not valid YAML", "#x0000"),
        id="nul-byte",
    ),
    pytest.param(
        text("name: tiny\ntrain:\n\tepochs: 1\n"),
        "file",
        ("not valid YAML", "line 3, column 1"),
        id="tab-indent",
    ),
    pytest.param(
        text("!!python/object/apply:os.system ['touch OUT']\n"),
        "file",
        ("not valid YAML", "python/object/apply"),
        id="python-tag",
    ),
    pytest.param(
        text("name: a\n---\nname: b\n"),
        "file",
        ("not valid YAML", "single document"),
        id="two-docs",
    ),
    pytest.param(const(RawText("")), "file", ("got NoneType",), id="empty-file"),
    # ---- outputs that cannot be a writable folder, and paths that escape
    pytest.param(
        set_("output", "../" * 40 + "etc/vramsweep-hostile"),
        "output",
        ("under the system folder /etc", "'../../"),
        id="output-escapes-to-etc",
    ),
    pytest.param(
        set_("output", "/proc/self/vramsweep"),
        "output",
        ("/proc", "'/proc/self/vramsweep'"),
        id="output-proc",
    ),
    pytest.param(set_("output", "/sys/vramsweep"), "output", ("/sys",), id="output-sys"),
    pytest.param(set_("output", "/"), "output", ("the root folder",), id="output-root"),
    pytest.param(set_("output", "a\0b"), "output", ("NUL",), id="output-nul"),
    pytest.param(
        set_("datasets", {"imagefolder": {"root": "../" * 30 + "no/such/vramsweep-data"}}),
        "datasets.imagefolder.root",
        ("no/such/vramsweep-data",),
        id="dataset-root-missing",
    ),
    pytest.param(
        set_("backbones", {"vit_test": {"pretrained": "../" * 30 + "no/weights.safetensors"}}),
        "backbones.vit_test",
        ("pretrained weights not found", "no/weights.safetensors"),
        id="pretrained-missing",
    ),
    pytest.param(
        set_("backbones", {"vit_test": {"pretrained": "w" * 4000 + ".safetensors"}}),
        "backbones.vit_test.pretrained",
        ("File name too long",),
        id="pretrained-name-too-long",
    ),
    pytest.param(
        set_("plugins", ["../" * 30 + "no/such_plugin.py"]),
        "plugins[0]",
        ("no/such_plugin.py",),
        id="plugin-path-escapes",
    ),
    # ---- URIs that records cannot be written to (refused offline, nothing contacted)
    pytest.param(
        set_("output", "http://example.com/sweep"),
        "output",
        ("'http' is not a scheme", "'http://example.com/sweep'"),
        id="uri-http",
    ),
    pytest.param(set_("output", "ftp://host/x"), "output", ("'ftp'",), id="uri-ftp"),
    pytest.param(
        set_("output", "s3://"), "output", ("needs a bucket", "'s3://'"), id="uri-bucketless"
    ),
    pytest.param(
        set_("output", "file:///proc/vramsweep"), "output", ("/proc",), id="uri-file-proc"
    ),
]


def _write(content: Any, tmp_path: Path, write_grid: Callable[[dict[str, Any]], Path]) -> Path:
    if isinstance(content, RawBytes):
        path = tmp_path / "raw.yaml"
        path.write_bytes(content)
        return path
    if isinstance(content, RawText):
        path = tmp_path / "raw.yaml"
        path.write_text(content)
        return path
    return write_grid(content)


def _tree(root: Path) -> dict[str, float]:
    """Every path under ``root`` with its modification time."""
    return {str(p): p.stat().st_mtime for p in root.rglob("*")}


@pytest.mark.parametrize(("mutation", "field", "fragments"), HOSTILE)
@pytest.mark.parametrize("command", [["validate"], ["run", "--dry-run"]], ids=["validate", "dry"])
def test_hostile_grid_exits_2_naming_file_field_value_and_writes_nothing(
    command: list[str],
    mutation: Callable[[dict[str, Any]], Any],
    field: str,
    fragments: tuple[str, ...],
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = Path(tiny_grid["output"])
    path = _write(mutation(tiny_grid), tmp_path, write_grid)
    before = _tree(tmp_path)

    code = main([command[0], str(path), *command[1:]])
    out, err = capsys.readouterr()

    assert code == 2, err
    assert err.startswith(f"orchestrate: error: {path}: {field}: "), err[:MAX_LINE]
    for fragment in fragments:
        assert fragment in err, err[:MAX_LINE]
    assert err.count("\n") == 1 and len(err) < MAX_LINE  # one line, however big the value
    assert "Traceback" not in out + err
    assert out == ""
    assert _tree(tmp_path) == before  # nothing created or changed, no output folder
    assert not output.exists()


def test_corpus_is_at_least_forty_grids() -> None:
    assert len(HOSTILE) >= 40


@pytest.mark.parametrize(
    "case",
    ["alias-bomb", "duplicate-top-level-key", "output-escapes-to-etc", "seed-past-int64"],
)
def test_real_orchestrate_process_refuses_hostile_grids(
    case: str,
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    tmp_path: Path,
) -> None:
    """The console script, as users run it: exit 2, one line, nothing written."""
    mutation, field, fragments = next(p.values for p in HOSTILE if p.id == case)
    path = _write(mutation(tiny_grid), tmp_path, write_grid)
    before = _tree(tmp_path)
    for command in (["validate", str(path)], ["run", str(path), "--dry-run"]):
        done = subprocess.run(
            [ORCHESTRATE, *command], capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"orchestrate: error: {path}: {field}: ")
        assert all(fragment in done.stderr for fragment in fragments), done.stderr
        assert done.stderr.count("\n") == 1 and done.stdout == ""
    assert _tree(tmp_path) == before
    assert not Path("/etc/vramsweep-hostile").exists()


# ---------------------------------------------------------------- size limit


def test_a_grid_of_ten_million_trials_is_refused_before_expansion(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """1000 budgets x 10,000 seeds x 1 x 1 x 2 methods: refused from the raw counts."""
    tiny_grid["budget_mb"] = list(range(1, 1001))
    tiny_grid["seeds"] = list(range(10_000))
    path = write_grid(tiny_grid)

    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: grid: " in err
    assert "budget_mb 1000 x seeds 10000" in err and "= 20,000,000 trials" in err
    assert f"over the limit of {MAX_TRIALS:,}" in err and "--max-trials N" in err


def test_max_trials_flag_lowers_and_raises_the_limit(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    tiny_grid["seeds"] = [0, 1, 2]  # 1 x 1 x 2 methods x 1 x 1 x 3 seeds = 6 trials
    path = write_grid(tiny_grid)

    assert main(["validate", str(path), "--max-trials", "5"]) == 2
    assert "= 6 trials, over the limit of 5" in capsys.readouterr().err
    assert main(["run", str(path), "--dry-run", "--max-trials", "5"]) == 2
    capsys.readouterr()
    assert main(["validate", str(path), "--max-trials", "6"]) == 0
    assert "valid; 6 trials" in capsys.readouterr().out
    assert main(["validate", str(path), "--max-trials", "0"]) == 2
    assert "--max-trials must be >= 1, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------- records hold every value


# record column of Arrow integer type that a grid fills -> the grid field
GRID_INT_COLUMNS = {
    "seed": ("seeds",),
    **{
        f"train_{n}": ("train", n) for n in ("epochs", "batch_size", "eval_batch_size", "max_steps")
    },
}


@pytest.mark.parametrize("column", sorted(GRID_INT_COLUMNS))
def test_every_integer_column_a_grid_fills_is_bounded_to_its_arrow_type(
    column: str,
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One past the largest value of the column's Arrow type is a grid error that names
    the field (not an OverflowError in the record callback after the sweep started)."""
    arrow = record_schema().field(column).type
    assert pa.types.is_int64(arrow)
    too_big = 2**63
    field = GRID_INT_COLUMNS[column]
    if field == ("seeds",):
        tiny_grid["seeds"] = [too_big]
    else:
        tiny_grid[field[0]][field[1]] = too_big
    path = write_grid(tiny_grid)

    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {'.'.join(field)}" in err or f"{path}: {field[0]}: " in err
    assert str(too_big) in err


def test_every_integer_column_of_the_spec_is_in_the_bound_test() -> None:
    """A spec field that becomes an integer column must join the test above."""
    spec_columns = {f.name for f in dataclasses.fields(TrialSpec) if f.name != "train"}
    spec_columns |= {f"train_{f.name}" for f in dataclasses.fields(TrainConfig)}
    int_columns = {
        f.name for f in record_schema() if f.name in spec_columns and pa.types.is_integer(f.type)
    }
    assert int_columns == set(GRID_INT_COLUMNS)


# ---------------------------------------------------------------- outputs


def test_output_under_a_folder_without_write_permission_is_refused(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Permission is asked of the nearest existing parent (os.access; as root every
    folder is writable, so the answer is made here)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    tiny_grid["output"] = str(locked / "sweep" / "out")
    path = write_grid(tiny_grid)
    real_access = os.access
    monkeypatch.setattr(
        outputs.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode)
    )

    assert main(["validate", str(path)]) == 2
    assert f"{path}: output: " in (err := capsys.readouterr().err)
    assert f"cannot write into {locked} (permission denied)" in err
    assert list(locked.iterdir()) == []


def test_output_that_is_an_existing_file_is_refused_and_left_alone(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    tiny_grid["output"] = str(target)
    path = write_grid(tiny_grid)

    assert main(["run", str(path), "--dry-run"]) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    tiny_grid["output"] = str(target / "sub")
    assert main(["validate", str(write_grid(tiny_grid))]) == 2
    assert f"lies under {target}, which is an existing file" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_dry_run_of_an_object_store_output_contacts_nothing(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An s3:// output validates and dry-runs offline: no record store (the one way to
    the object store) is made for it."""

    def no_store(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a dry run opened the record store")

    monkeypatch.setattr(cli, "RecordStore", no_store)
    tiny_grid["output"] = "s3://bucket/sweeps/tiny"
    path = write_grid(tiny_grid)

    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "does not contact s3://bucket/sweeps/tiny" in out
    assert "2 trials, 0 already recorded, 2 to run" in out
    assert main(["validate", str(path)]) == 0


def test_dry_run_creates_no_output_folder(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    tiny_grid["output"] = str(Path(tiny_grid["output"]) / "deep" / "er")
    path = write_grid(tiny_grid)

    assert main(["run", str(path), "--dry-run"]) == 0
    assert "2 to run" in capsys.readouterr().out
    assert not Path(tiny_grid["output"]).parent.parent.exists()


# ---------------------------------------------------------------- the loader keeps YAML's features


def test_anchors_and_merge_keys_within_the_bounds_still_work(
    tiny_grid: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content = grid_yaml(
        "methods:\n  lora: &common {alpha: 8, dropout: 0.1}\n"
        "  adalora: {<<: *common, init_r: 6, target_r: 4}\n"
    )(tiny_grid)
    path = tmp_path / "anchors.yaml"
    path.write_text(content)

    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert "valid; 2 trials" in capsys.readouterr().out
    specs = expand(load_grid(path))
    assert [s.method_args["dropout"] for s in specs] == [0.1, 0.1]
