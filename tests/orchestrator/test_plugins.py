"""Plug-ins through the grid and the command line: a grid's ``plugins:`` make its names
valid; a plug-in that does not load fails `orchestrate validate` with exit 2 naming
file, field and value; a sweep through Ray runs a plug-in's backbone and method on
workers that got the plug-in from Ray's runtime environment, not from the driver."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.grid import load_grid
from orchestrator.records import RecordStore
from tests.plugin_files import (
    LAB_BACKBONE,
    LAB_DIM,
    LAB_METHOD,
    plugin_sandbox,
    write_lab_plugins,
    write_module,
)

REPO_ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def _sandbox(tmp_path: Path) -> Iterator[None]:
    with plugin_sandbox(tmp_path):
        yield


@pytest.fixture
def lab(tmp_path: Path) -> tuple[Path, Path]:
    return write_lab_plugins(tmp_path)


def _lab_grid(grid: dict[str, Any], plugins: list[str]) -> dict[str, Any]:
    grid["plugins"] = plugins
    grid["backbones"] = [LAB_BACKBONE]
    grid["methods"] = {LAB_METHOD: {}, "bitfit": {}}
    return grid


@pytest.mark.parametrize(
    ("entries", "modules"),
    [
        (["my_lab.vramsweep_ext", "head_only"], ("my_lab.vramsweep_ext", "head_only")),
        (["pkgs/my_lab/vramsweep_ext.py", "./head_only.py"], ("my_lab.vramsweep_ext", "head_only")),
        (["./pkgs/my_lab", "head_only.py"], ("my_lab", "head_only")),
    ],
    ids=["module-names", "files", "package-folder"],
)
def test_plugins_make_their_names_valid(
    entries: list[str],
    modules: tuple[str, ...],
    lab: tuple[Path, Path],
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from workers.backbones import BACKBONES

    if entries[0] == "my_lab.vramsweep_ext":  # module names: found on the Python path
        monkeypatch.syspath_prepend(str(lab[0]))
        monkeypatch.syspath_prepend(str(lab[1].parent))
    else:  # paths: relative to the grid file, wherever the command runs
        monkeypatch.chdir(REPO_ROOT)
    assert LAB_BACKBONE not in BACKBONES
    path = write_grid(_lab_grid(tiny_grid, entries))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: valid; 2 trials" in out and LAB_METHOD in out and LAB_BACKBONE in out
    grid = load_grid(path)  # again in the same process: nothing registers twice
    assert grid.plugins == modules
    assert [c.name for c in grid.methods] == [LAB_METHOD, "bitfit"]


def test_a_grid_without_the_plugin_does_not_know_its_names(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_grid(_lab_grid(tiny_grid, []))
    assert main(["validate", str(path)]) == 2
    assert f"unknown backbone {LAB_BACKBONE!r}" in capsys.readouterr().err


_RAISES = '"""Fails at import."""\n\nraise ValueError("the lab config is missing\\nsecond line")\n'
_DEPENDENCY = "import not_a_dependency_anyone_has  # noqa: F401\n"
_DUPLICATE = """
from workers.backbones import BACKBONES, TRANSFORMER, BackboneConfig


@BACKBONES.register(config_cls=BackboneConfig, tags=(TRANSFORMER,))
def vit_test(config, num_classes):
    return None
"""


@pytest.mark.parametrize(
    ("files", "entry", "reason"),
    [
        ({}, "no_such_lab.ext", "no module named 'no_such_lab'"),
        ({}, "./nowhere/ext.py", "no such .py file or package folder"),
        ({"plug/bad_dep.py": _DEPENDENCY}, "./plug/bad_dep.py", "the module fails to import: "
         "ModuleNotFoundError: No module named 'not_a_dependency_anyone_has'"),
        ({"plug/raises.py": _RAISES}, "./plug/raises.py",
         "the module fails to import: ValueError: the lab config is missing"),
        ({"plug/dup.py": _DUPLICATE}, "./plug/dup.py",
         "RegistryError: backbone 'vit_test' is already registered"),
        ({"plug/not_pkg/x.txt": ""}, "./plug/not_pkg", "a folder without __init__.py"),
        ({}, "my lab", "neither a module name"),
    ],
    ids=["missing-module", "missing-file", "import-error", "raises", "duplicate", "no-package",
         "not-a-name"],
)  # fmt: skip
def test_a_plugin_that_does_not_load_is_a_grid_error(
    files: dict[str, str],
    entry: str,
    reason: str,
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, text in files.items():
        write_module(tmp_path / name, text)
    tiny_grid["plugins"] = ["json", entry]  # the second entry is the bad one
    path = write_grid(tiny_grid)
    for command in ("validate", "run"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{path}: plugins[1]: {entry!r}: " in err, err
        assert reason in err, err
        assert "second line" not in err and "Traceback" not in err
    assert not Path(tiny_grid["output"]).exists()  # nothing written, no trial started


def test_plugins_must_be_a_list_of_names(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    tiny_grid["plugins"] = [{"module": "my_lab"}]
    assert main(["validate", str(write_grid(tiny_grid))]) == 2
    assert "plugins: must be a list of module names or paths" in capsys.readouterr().err


def _dist_info(site: Path, module: str, source: str) -> None:
    """An installed distribution ``lab-ep`` as importlib.metadata sees it: its metadata
    folder with one entry point of the plug-in group, and its module."""
    info = site / "lab_ep-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-ep\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[vramsweep.plugins]\nlab = {module}\n")
    write_module(site / f"{module}.py", source)


def test_entry_point_plugins_load_before_validation(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from workers.backbones import BACKBONES
    from workers.plugins import load_entry_points

    write_lab_plugins(tmp_path)  # the lab's backbone module, as an installed one's source
    source = (tmp_path / "pkgs" / "my_lab" / "vramsweep_ext.py").read_text()
    _dist_info(tmp_path / "site", "lab_ep_ext", source)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    tiny_grid["backbones"] = [LAB_BACKBONE]  # named, with no plugins field
    tiny_grid["methods"] = ["bitfit"]
    assert main(["validate", str(write_grid(tiny_grid))]) == 0
    assert LAB_BACKBONE in BACKBONES
    assert load_entry_points() == ("lab_ep_ext",)  # once per process: not imported again


def test_an_entry_point_that_fails_names_it_and_its_distribution(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _dist_info(tmp_path / "site", "lab_ep_broken", _RAISES)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = write_grid(tiny_grid)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: plugins: " in err
    assert "entry point 'lab' = 'lab_ep_broken' of distribution 'lab-ep'" in err
    assert "ValueError: the lab config is missing" in err


@pytest.mark.ray
def test_sweep_ships_plugins_to_the_workers(
    lab: tuple[Path, Path], tiny_grid: dict[str, Any], tmp_path: Path
) -> None:
    """``orchestrate run`` in a driver that finds ``my_lab`` on its sys.path only (not in
    the environment its Ray workers inherit), and ``head_only.py`` through the grid's
    relative path: the trials run both, from Ray's shipped copies (the plug-ins check)."""
    pkgs, method = lab
    grid = _lab_grid(tiny_grid, ["my_lab.vramsweep_ext", "./head_only.py"])
    grid["methods"] = {LAB_METHOD: {}}
    grid["datasets"] = {"digits": {"image_size": 16, "fraction": 0.1}}
    grid["train"] = {"epochs": 1, "max_steps": 2, "batch_size": 16}
    path = method.parent / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    work = tmp_path / "elsewhere"  # the driver's working directory, which Ray adds to workers
    work.mkdir()
    code = (
        f"import sys; sys.path.insert(0, {str(pkgs)!r}); from orchestrator.cli import main; "
        f"raise SystemExit(main(['run', {str(path)!r}, '--no-progress', '--no-dashboard']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    frame = RecordStore(grid["output"]).collect()
    assert len(frame) == 1, done.stdout + done.stderr
    row = frame.iloc[0]
    assert row["status"] == "ok", row["error"]  # a worker without the plug-in: failed
    assert done.returncode == 0, done.stdout + done.stderr
    assert (row["backbone"], row["method"], row["dataset"]) == (LAB_BACKBONE, LAB_METHOD, "digits")
    assert 0.0 <= row["accuracy"] <= 1.0
    assert row["params_trainable"] == LAB_DIM * 10 + 10  # the head alone, over 10 digits


@pytest.mark.ray
def test_search_tasks_get_the_plugins(
    lab: tuple[Path, Path], tiny_grid: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search's Ray tasks (``SpecRunner``) import the grid's plug-ins, shipped from a
    driver that has them on its sys.path only; a worker that cannot import one records
    the trial as failed, naming it."""
    import ray

    from orchestrator.expansion import expand
    from orchestrator.grid import parse_grid
    from orchestrator.tune_driver import SpecRunner

    if ray.is_initialized():  # a Ray started before cannot take a runtime environment
        ray.shutdown()
    monkeypatch.syspath_prepend(str(lab[0]))
    raw = _lab_grid(tiny_grid, ["my_lab.vramsweep_ext", str(lab[1])])
    raw["methods"] = {LAB_METHOD: {}}
    grid = parse_grid(raw)
    [spec] = expand(grid)
    records = {}
    try:
        runner = SpecRunner(
            grid.resources, budgets_mb={spec.budget_mb}, capacity=2, plugins=grid.plugins
        )
        runner.submit(0, spec)
        runner.plugins.append("no_such_lab")  # as if the workers' environment lacked one
        runner.submit(1, spec)
        while len(records) < 2:
            records.update(runner.wait(120, lambda key, figures: True))
    finally:
        ray.shutdown()
    assert records[0].status == "ok", records[0].error
    assert (records[0].spec.backbone, records[0].spec.method) == (LAB_BACKBONE, LAB_METHOD)
    assert records[0].accuracy is not None
    assert records[1].status == "failed"
    assert records[1].error.startswith("plug-in 'no_such_lab': no module named 'no_such_lab'")
