"""Grid files: every malformed grid fails `orchestrate validate` with exit 2 and a message
that names the file, the field and the offending value; valid grids expand as expected."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import main
from orchestrator.expansion import expand
from orchestrator.grid import GridError, load_grid, parse_grid

REPO_ROOT = Path(__file__).parents[2]

# ---------------------------------------------------------------- mutations
#
# A mutation takes a deep copy of the tiny grid and returns what to write: a dict or
# list is dumped as YAML, a ``RawText`` is written verbatim, ``MISSING`` means "pass a
# path that does not exist".

Mutation = Callable[[dict[str, Any]], Any]


class RawText(str):
    """File content written as is (to produce invalid YAML)."""


MISSING = object()


def set_(path: str, value: Any) -> Mutation:
    """Set the dotted ``path`` (e.g. ``train.lr``) to ``value``."""

    def mutate(grid: dict[str, Any]) -> dict[str, Any]:
        *parents, leaf = path.split(".")
        node = grid
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
        return grid

    return mutate


def delete(key: str) -> Mutation:
    """Remove the top-level field ``key``."""

    def mutate(grid: dict[str, Any]) -> dict[str, Any]:
        del grid[key]
        return grid

    return mutate


def const(value: Any) -> Mutation:
    """Ignore the grid; write ``value`` instead."""
    return lambda grid: value


# (mutation, field as printed after the file name, fragments the message must contain)
MALFORMED: list[Any] = [
    pytest.param(
        set_("colour", "red"),
        "colour",
        ("unknown field 'colour'", "valid fields: name, output, budget_mb"),
        id="unknown-top-level-key",
    ),
    pytest.param(delete("seeds"), "seeds", ("required field is missing",), id="missing-seeds"),
    pytest.param(
        delete("datasets"), "datasets", ("required field is missing",), id="missing-datasets"
    ),
    pytest.param(set_("name", "my grid"), "name", ("'my grid'",), id="name-with-space"),
    pytest.param(
        set_("backbones", {"vit_huge": {}}),
        "backbones",
        ("unknown backbone 'vit_huge'", "vit_test", "tiny_vit_test"),
        id="unknown-backbone",
    ),
    pytest.param(
        set_("backbones", {"resnet1888": {}}),
        "backbones",
        ("unknown backbone 'resnet1888'", "did you mean resnet18"),
        id="unknown-timm-backbone",
    ),
    pytest.param(
        set_("backbones", {"resnet18": {"model_args": {"depth_multiplier": 2}}}),
        "backbones.resnet18",
        ("cannot be built", "unexpected keyword argument 'depth_multiplier'"),
        id="model-args-timm-rejects",
    ),
    pytest.param(
        set_("backbones", {"efficientformer_l1": {"img_size": 32}}),
        "backbones.efficientformer_l1",
        ("does not run on 32 px inputs",),
        id="timm-backbone-at-a-size-it-cannot-take",
    ),
    pytest.param(
        lambda g: {**g, "backbones": {"resnet18": {"img_size": 32}}, "methods": {"lora": {}}},
        "methods",
        ("'lora' does not apply to backbone 'resnet18'", "set `convs: true`", "to exclude"),
        id="lora-on-a-cnn-without-convs",
    ),
    pytest.param(
        set_("methods", {"adapterx": {}}),
        "methods",
        (
            "unknown method 'adapterx'",
            "adalora, bitfit, full, lbp_wht, lora, mobiletl, qlora, snella",
        ),
        id="unknown-method",
    ),
    pytest.param(
        set_("checkpointing", ["everything"]),
        "checkpointing",
        ("unknown checkpointing 'everything'", "none, static"),
        id="unknown-checkpointing",
    ),
    pytest.param(
        set_("datasets", ["imagenet"]),
        "datasets",
        ("unknown dataset 'imagenet'", "cifar100, digits, dtd, hf, imagefolder, synthetic"),
        id="unknown-dataset",
    ),
    pytest.param(
        set_("methods", {"lora": {"rank": 4}}),
        "methods.lora",
        ("unknown argument(s) ['rank']", "valid: alpha, convs, dropout, r, target"),
        id="unknown-method-argument",
    ),
    pytest.param(
        set_("methods", {"lora": {"r": "eight"}}),
        "methods.lora",
        ("argument 'r' must be int", "'eight'"),
        id="wrong-argument-type",
    ),
    pytest.param(
        set_("methods", {"lora": {"r": 0}}),
        "methods.lora",
        ("r must be >= 1, got 0",),
        id="impossible-argument-value",
    ),
    pytest.param(
        set_("methods", {"lora": 5}),
        "methods.lora",
        ("arguments must be a mapping, got 5",),
        id="arguments-not-a-mapping",
    ),
    pytest.param(
        set_("checkpointing", {"static": {"every": 0}}),
        "checkpointing.static",
        ("every must be >= 1, got 0",),
        id="checkpointing-argument-value",
    ),
    pytest.param(set_("seeds", []), "seeds", ("must not be empty",), id="empty-seeds"),
    pytest.param(set_("seeds", [0, -1]), "seeds", ("integers >= 0", "got -1"), id="negative-seed"),
    pytest.param(set_("seeds", [0, 1, 0]), "seeds", ("0 appears twice",), id="duplicate-seed"),
    pytest.param(set_("seeds", [0.5]), "seeds", ("got 0.5",), id="float-seed"),
    pytest.param(set_("budget_mb", 0), "budget_mb", ("> 0", "got 0"), id="budget-zero"),
    pytest.param(set_("budget_mb", -512), "budget_mb", ("got -512",), id="budget-negative"),
    pytest.param(set_("budget_mb", "lots"), "budget_mb", ("got 'lots'",), id="budget-string"),
    pytest.param(
        set_("budget_mb", [1024, 1024]), "budget_mb", ("1024 appears twice",), id="budget-duplicate"
    ),
    pytest.param(set_("methods", {}), "methods", ("must not be empty",), id="empty-methods"),
    pytest.param(set_("backbones", []), "backbones", ("must not be empty",), id="empty-backbones"),
    pytest.param(
        set_("train.epochs", 0),
        "train",
        ("epochs must be an integer >= 1, got 0",),
        id="train-epochs-zero",
    ),
    pytest.param(
        set_("train.lr", -0.01),
        "train",
        ("lr must be a number > 0, got -0.01",),
        id="train-lr-negative",
    ),
    pytest.param(
        set_("train.precision", "fp8"),
        "train",
        ("precision must be one of", "'fp8'"),
        id="train-precision-fp8",
    ),
    pytest.param(
        set_("train.momentum", 0.9),
        "train",
        ("unknown field 'momentum'", "batch_size"),
        id="train-unknown-key",
    ),
    pytest.param(set_("train", [1, 2]), "train", ("must be a mapping",), id="train-not-a-mapping"),
    pytest.param(
        set_("resources.max_concurrent", 0),
        "resources",
        ("max_concurrent must be an integer >= 1, got 0",),
        id="resources-max-concurrent-zero",
    ),
    pytest.param(
        set_("resources.gpus", 1),
        "resources",
        ("unknown field 'gpus'",),
        id="resources-unknown-key",
    ),
    pytest.param(
        set_("energy.meter", "wattmeter"),
        "energy",
        ("meter must be one of", "'nvml_energy'", "got 'wattmeter'"),
        id="energy-unknown-meter",
    ),
    pytest.param(
        set_("energy.poll_hz", 2),
        "energy",
        ("poll_hz must be a number in [10, 1000], got 2",),
        id="energy-slow-polling",
    ),
    pytest.param(
        set_("exclude", [{"optimizer": "sgd"}]),
        "exclude[0]",
        ("unknown axis 'optimizer'", "backbone, method"),
        id="exclude-unknown-axis",
    ),
    pytest.param(
        set_("exclude", [{"backbone": "tiny_vit_test"}]),
        "exclude[0]",
        ("backbone 'tiny_vit_test' is not in the grid",),
        id="exclude-backbone-not-in-grid",
    ),
    pytest.param(
        set_("exclude", [{"method": "full"}, {"seed": 7}]),
        "exclude[1]",
        ("seed 7 is not in the grid",),
        id="exclude-seed-not-in-grid",
    ),
    pytest.param(
        set_("exclude", {"method": "full"}), "exclude", ("must be a list",), id="exclude-not-a-list"
    ),
    pytest.param(
        set_("baselines", [{"name": "clip_zero_shot"}]),
        "baselines[0]",
        ("unknown baseline 'clip_zero_shot'",),
        id="unregistered-baseline",
    ),
    pytest.param(
        const(RawText("name: tiny\nseeds: [0, 1\n")),
        "file",
        ("not valid YAML",),
        id="yaml-syntax-error",
    ),
    pytest.param(
        const(["name", "tiny"]), "file", ("must be a mapping of fields, got list",), id="yaml-list"
    ),
    pytest.param(const(MISSING), "file", ("cannot read it",), id="file-does-not-exist"),
    pytest.param(
        set_("exclude", [{"backbone": "vit_test"}]),
        "exclude",
        ("every trial is excluded",),
        id="everything-excluded",
    ),
]


@pytest.mark.parametrize(("mutation", "field", "fragments"), MALFORMED)
def test_malformed_grid_fails_validation(
    mutation: Mutation,
    field: str,
    fragments: tuple[str, ...],
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Exit 2; stderr names the file, the field and the offending value; no traceback."""
    content = mutation(tiny_grid)
    if content is MISSING:
        path = tmp_path / "absent.yaml"
    elif isinstance(content, RawText):
        path = tmp_path / "raw.yaml"
        path.write_text(content)
    else:
        path = write_grid(content)

    code = main(["validate", str(path)])
    out, err = capsys.readouterr()

    assert code == 2, err
    assert f"{path}: {field}: " in err
    for fragment in fragments:
        assert fragment in err
    assert "Traceback" not in err + out
    assert "valid;" not in out  # nothing was reported as valid


def test_grid_error_carries_source_and_field(tiny_grid: dict[str, Any]) -> None:
    """GridError keeps file and field apart for programmatic callers."""
    tiny_grid["seeds"] = []
    with pytest.raises(GridError) as info:
        parse_grid(tiny_grid, "here.yaml")
    assert (info.value.source, info.value.where) == ("here.yaml", "seeds")
    assert str(info.value).startswith("here.yaml: seeds: ")


# ---------------------------------------------------------------- valid grids


def test_valid_tiny_grid_lists_every_trial(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`validate` exits 0 and prints each trial id and the trial count."""
    path = write_grid(tiny_grid)
    ids = [s.trial_id for s in expand(load_grid(path))]
    assert len(ids) == 2  # 1 backbone x 2 methods x 1 checkpointing x 1 seed x 1 budget

    code = main(["validate", str(path)])
    out, err = capsys.readouterr()

    assert code == 0, err
    for trial_id in ids:
        assert trial_id in out
    assert f"{path}: valid; {len(ids)} trials" in out


def test_dry_run_lists_trials_and_runs_nothing(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`run --dry-run` prints what would run and writes no records."""
    path = write_grid(tiny_grid)
    ids = [s.trial_id for s in expand(load_grid(path))]

    code = main(["run", str(path), "--dry-run"])
    out, err = capsys.readouterr()

    assert code == 0, err
    assert "2 trials, 0 already recorded, 2 to run" in out
    for trial_id in ids:
        assert trial_id in out
    records = Path(tiny_grid["output"]) / "records"
    assert not records.exists() or not any(records.iterdir())


def test_registry_arguments_are_completed_with_defaults(
    tiny_grid: dict[str, Any], write_grid: Callable[[dict[str, Any]], Path]
) -> None:
    """`lora: {}` expands to the LoRA config's defaults, r = 8 and alpha = 16.0."""
    tiny_grid["methods"] = {"lora": {}}
    specs = expand(load_grid(write_grid(tiny_grid)))
    assert len(specs) == 1
    args = specs[0].method_args
    assert args["r"] == 8 and isinstance(args["r"], int)
    assert args["alpha"] == 16.0 and isinstance(args["alpha"], float)
    assert args["dropout"] == 0.0
    assert "target" in args
    # datasets are completed too: noise is not in the tiny grid
    assert specs[0].dataset_args["noise"] == 0.25


def test_int_for_float_argument_becomes_float(
    tiny_grid: dict[str, Any], write_grid: Callable[[dict[str, Any]], Path]
) -> None:
    """`alpha: 16` is accepted for a float argument and stored as 16.0 (same id as 16.0)."""
    tiny_grid["methods"] = {"lora": {"r": 4, "alpha": 16}}
    as_int = expand(load_grid(write_grid(tiny_grid)))[0]
    tiny_grid["methods"] = {"lora": {"r": 4, "alpha": 16.0}}
    as_float = expand(load_grid(write_grid(tiny_grid)))[0]

    assert type(as_int.method_args["alpha"]) is float
    assert as_int.method_args["alpha"] == 16.0
    assert as_int.method_args["r"] == 4
    assert as_int.trial_id == as_float.trial_id


def test_yaml_string_float_is_read_as_number(
    tiny_grid: dict[str, Any], write_grid: Callable[[dict[str, Any]], Path]
) -> None:
    """PyYAML reads `1e-3` as a string; train fields with float defaults accept it."""
    tiny_grid["train"]["lr"] = "1e-3"
    grid = load_grid(write_grid(tiny_grid))
    assert grid.train.lr == pytest.approx(1e-3)


# ---------------------------------------------------------------- shipped grids


@pytest.fixture
def in_repo_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test from the repository root, where grid/ lives."""
    monkeypatch.chdir(REPO_ROOT)
    return REPO_ROOT


def test_smoke_grid_is_valid_and_has_12_trials(in_repo_root: Path) -> None:
    """grid/smoke.yaml: 2 backbones x 3 methods x 2 checkpointing x 1 dataset x 1 seed."""
    grid = load_grid("grid/smoke.yaml")
    specs = expand(grid)
    assert grid.name == "smoke"
    assert len(specs) == 12
    assert len({s.trial_id for s in specs}) == 12
    assert {s.backbone for s in specs} == {"vit_test", "tiny_vit_test"}
    assert {s.method for s in specs} == {"full", "lora", "bitfit"}


def test_methods_grid_runs_every_method_where_it_applies(in_repo_root: Path) -> None:
    """grid/methods.yaml: every method on exactly the tiny backbones it applies to."""
    from workers.methods import METHODS, check_applicable

    specs = expand(load_grid("grid/methods.yaml"))
    assert {s.method for s in specs} == set(METHODS.names())
    pairs = {(s.backbone, s.method) for s in specs}
    for backbone in {s.backbone for s in specs}:
        for method in METHODS.names():
            try:
                check_applicable(method, backbone)
                fits = True
            except ValueError:
                fits = False
            assert ((backbone, method) in pairs) == fits, (backbone, method)


def test_paper_grid_is_valid(in_repo_root: Path) -> None:
    """grid/paper.yaml validates and expands to a non-empty set of unique trials."""
    grid = load_grid("grid/paper.yaml")
    specs = expand(grid)
    assert grid.name == "paper"
    assert specs
    assert len({s.trial_id for s in specs}) == len(specs)
    expected = (
        len(grid.datasets)
        * len(grid.backbones)
        * len(grid.methods)
        * len(grid.checkpointing)
        * len(grid.budgets_mb)
        * len(grid.seeds)
    )
    if not grid.exclude and not grid.baselines:
        assert len(specs) == expected


# ---------------------------------------------------------------- odd values
#
# User errors that once escaped as the wrong exit code or without naming the field.


def test_exclude_with_list_value_is_a_user_error(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`exclude: [{backbone: [{...}]}]` (a list of mappings) is exit 2 naming the axis."""
    tiny_grid["exclude"] = [{"backbone": [{"name": "vit_test"}]}]
    path = write_grid(tiny_grid)
    code = main(["validate", str(path)])
    _, err = capsys.readouterr()
    assert code == 2
    assert f"{path}: exclude[0].backbone" in err and "vit_test" in err


def test_exclude_list_value_matches_any_of_its_values(tiny_grid: dict[str, Any]) -> None:
    tiny_grid["backbones"] = ["vit_test", "tiny_vit_test"]
    tiny_grid["methods"] = ["full", "bitfit", "lora"]
    tiny_grid["exclude"] = [{"backbone": ["vit_test"], "method": ["bitfit", "lora"]}]
    pairs = [(s.backbone, s.method) for s in expand(parse_grid(tiny_grid))]
    assert sorted(pairs) == sorted(
        [("vit_test", "full")] + [("tiny_vit_test", m) for m in ("full", "bitfit", "lora")]
    )


def test_exclude_list_with_a_value_not_in_the_grid_is_an_error(tiny_grid: dict[str, Any]) -> None:
    tiny_grid["exclude"] = [{"method": ["full", "adalora"]}]
    with pytest.raises(GridError, match="method 'adalora' is not in the grid"):
        parse_grid(tiny_grid)


def test_train_epochs_string_names_the_field(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`train: {epochs: "3"}` should say epochs and '3', not a '<=' TypeError."""
    tiny_grid["train"]["epochs"] = "3"
    path = write_grid(tiny_grid)
    code = main(["validate", str(path)])
    _, err = capsys.readouterr()
    assert code == 2
    assert "epochs" in err and "'3'" in err


def test_infinite_budget_is_rejected_as_budget_mb(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`budget_mb: .inf` should fail on budget_mb, not on 'grid' at expansion."""
    tiny_grid["budget_mb"] = float("inf")
    path = write_grid(tiny_grid)
    code = main(["validate", str(path)])
    _, err = capsys.readouterr()
    assert code == 2
    assert f"{path}: budget_mb: " in err


def test_non_utf8_file_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A grid file that is not UTF-8 should be exit 2 naming the file."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    code = main(["validate", str(path)])
    _, err = capsys.readouterr()
    assert code == 2
    assert f"{path}: file: " in err


# ---------------------------------------------------------------- method x backbone


def test_method_that_does_not_fit_a_backbone_fails_validation(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    tiny_grid["backbones"] = {"vit_test": {}, "mobilenetv2_test": {}}
    tiny_grid["methods"] = {"lora": {}, "mobiletl": {}}
    path = write_grid(tiny_grid)
    code = main(["validate", str(path)])
    _, err = capsys.readouterr()
    assert code == 2
    assert f"{path}: methods:" in err
    assert "'mobiletl' does not apply to backbone 'vit_test'" in err
    assert "{backbone: vit_test, method: mobiletl} to exclude" in err


def test_excluding_the_unfit_pairs_makes_the_grid_valid(tiny_grid: dict[str, Any]) -> None:
    tiny_grid["backbones"] = {"vit_test": {}, "mobilenetv2_test": {}}
    tiny_grid["methods"] = {"lora": {}, "mobiletl": {}, "full": {}}
    tiny_grid["exclude"] = [
        {"backbone": "vit_test", "method": "mobiletl"},
        {"method": "lora", "backbone": "mobilenetv2_test"},
    ]
    specs = expand(parse_grid(tiny_grid))
    pairs = {(s.backbone, s.method) for s in specs}
    assert pairs == {
        ("vit_test", "lora"),
        ("vit_test", "full"),
        ("mobilenetv2_test", "mobiletl"),
        ("mobilenetv2_test", "full"),
    }


def test_exclusion_narrower_than_the_pair_does_not_excuse_it(tiny_grid: dict[str, Any]) -> None:
    tiny_grid["backbones"] = {"mobilenetv2_test": {}}
    tiny_grid["methods"] = {"lora": {}}
    tiny_grid["seeds"] = [0, 1]
    tiny_grid["exclude"] = [{"backbone": "mobilenetv2_test", "method": "lora", "seed": 0}]
    with pytest.raises(GridError, match="'lora' does not apply to backbone 'mobilenetv2_test'"):
        parse_grid(tiny_grid)
