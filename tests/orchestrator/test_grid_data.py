"""Grid validation of one's own data: a missing folder, an empty class folder, an absent
column or an unknown torchvision class is exit 2 at `validate`, naming file, field and
value; nothing is decoded, nothing written, no trial started."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import main
from orchestrator.grid import GridError, load_grid
from tests.dataset_files import write_hf, write_imagefolder


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VRAMSWEEP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _with_dataset(grid: dict[str, Any], name: str, args: dict[str, Any]) -> dict[str, Any]:
    grid["datasets"] = {name: {"image_size": 16, **args}}
    return grid


def _bad_cases(tmp: Path) -> list[tuple[str, dict[str, Any], str, str]]:
    """(dataset, arguments, field, message fragment), the files made under ``tmp``."""
    write_imagefolder(tmp / "no_test")
    for folder in (tmp / "no_test" / "test").iterdir():
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    (tmp / "no_test" / "test").rmdir()
    write_imagefolder(tmp / "empty_class")
    (tmp / "empty_class" / "train" / "eel").mkdir()
    write_hf(tmp / "hf")
    return [
        ("imagefolder", {"root": str(tmp / "nowhere")}, "root", f"no folder {tmp / 'nowhere'}"),
        ("imagefolder", {"root": str(tmp / "no_test")}, "root", "must hold train/ and test/"),
        ("imagefolder", {"root": str(tmp / "empty_class")}, "root", "holds no image"),
        (
            "hf",
            {"path": str(tmp / "hf"), "label_column": "fine"},
            "label_column",
            "no column 'fine'",
        ),
        ("torchvision", {"name": "Flowers"}, "", "name 'Flowers' is no torchvision.datasets class"),
    ]


CASES = ["missing-root", "missing-test", "empty-class", "hf-column", "torchvision-name"]


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASES)
def test_validate_exits_2_naming_file_field_and_value(
    case: int,
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    tmp_path: Path,
    cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name, args, field, fragment = _bad_cases(tmp_path / "data")[case]
    path = write_grid(_with_dataset(tiny_grid, name, args))
    where = f"datasets.{name}" + (f".{field}" if field else "")
    with pytest.raises(GridError, match=re.escape(fragment)) as info:
        load_grid(path)
    assert info.value.where == where
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {where}: " in err and fragment in err and "Traceback" not in err
    assert not Path(tiny_grid["output"]).exists() and not cache.exists()


def test_a_valid_image_folder_validates_without_decoding(
    tiny_grid: dict[str, Any],
    write_grid: Callable[[dict[str, Any]], Path],
    tmp_path: Path,
    cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_imagefolder(tmp_path / "images")
    (tmp_path / "images" / "train" / "cat" / "99.png").write_bytes(b"corrupt: found at decode")
    path = write_grid(_with_dataset(tiny_grid, "imagefolder", {"root": str(tmp_path / "images")}))
    assert main(["validate", str(path)]) == 0
    assert "imagefolder" in capsys.readouterr().out
    assert not cache.exists()
