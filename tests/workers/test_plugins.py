"""workers.plugins on its own: importing plug-ins once, the module a path names, and
what must be shipped to a cluster (only what its workers' environment cannot import)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugin_files import LAB_BACKBONE, plugin_sandbox, write_lab_plugins, write_module
from workers.plugins import PluginError, import_plugin, load_plugins, shipped_paths


@pytest.fixture(autouse=True)
def _sandbox(tmp_path: Path) -> Iterator[None]:
    with plugin_sandbox(tmp_path):
        yield


def test_plugins_are_imported_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.backbones import BACKBONES

    pkgs, _ = write_lab_plugins(tmp_path)
    monkeypatch.syspath_prepend(str(pkgs))
    # the package, its module by name and by path: one module, registered once
    assert load_plugins(["my_lab"]) == ("my_lab",)
    assert load_plugins(["my_lab.vramsweep_ext"]) == ("my_lab.vramsweep_ext",)
    entry = "pkgs/my_lab/vramsweep_ext.py"
    assert import_plugin(entry, base=tmp_path) == "my_lab.vramsweep_ext"
    assert LAB_BACKBONE in BACKBONES


def test_a_path_must_be_the_module_it_names(tmp_path: Path) -> None:
    write_module(tmp_path / "lab" / "json.py", "raise RuntimeError('never imported')\n")
    with pytest.raises(PluginError, match=r"another module named 'json' is imported instead"):
        import_plugin("./lab/json.py", base=tmp_path)


def test_a_module_inside_a_package_is_imported_by_its_dotted_name(tmp_path: Path) -> None:
    write_module(tmp_path / "a" / "__init__.py", "")
    write_module(tmp_path / "a" / "b" / "__init__.py", "")
    write_module(tmp_path / "a" / "b" / "ext.py", "VALUE = 3\n")
    assert import_plugin(str(tmp_path / "a" / "b" / "ext.py")) == "a.b.ext"
    assert shipped_paths(["a.b.ext"]) == [str((tmp_path / "a").resolve())]


def test_only_what_the_workers_cannot_import_is_shipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkgs, method = write_lab_plugins(tmp_path)
    monkeypatch.syspath_prepend(str(pkgs))
    assert import_plugin(str(method)) == "head_only"
    load_plugins(["my_lab.vramsweep_ext"])
    modules = ["json", "yaml", "workers.methods.lora", "my_lab.vramsweep_ext", "my_lab"]
    # the standard library, an installed distribution and this project are not shipped;
    # a local package is, as its top-level folder (once), a single module as its file
    assert shipped_paths([*modules, "head_only"]) == [
        str((pkgs / "my_lab").resolve()),
        str(method.resolve()),
    ]
    with pytest.raises(PluginError, match="'no_such_lab' is not importable here"):
        shipped_paths(["no_such_lab.ext"])
