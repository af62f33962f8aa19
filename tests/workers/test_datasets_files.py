"""cifar100 and dtd read from tiny copies of the official on-disk formats, made here."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.dataset_files import write_cifar
from workers.data import DATASETS, DEFAULT_ROOT, ImageData, source_args
from workers.registry import RegistryError

# --------------------------------------------------------------------------- CIFAR-100 files


def load(name: str, **args: object) -> ImageData:
    return DATASETS.build(name, args)  # not load_dataset: its cache would hide file changes


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar100_decodes_chw_rows_and_labels(tmp_path: Path, protocol: int) -> None:
    written = write_cifar(tmp_path, protocol)
    data = load("cifar100", root=str(tmp_path))
    train, labels = written["train"]
    assert data.train_x.shape == (12, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (6, 3, 32, 32)
    assert data.train_y.tolist() == labels and data.test_y.tolist() == written["test"][1]
    assert data.num_classes == 3 and data.classes == ("apple", "bear", "cloud")
    first = data.train_x[0]
    assert (first[0, 0, 0], first[1, 0, 31], first[2, 5, 3]) == (7, 200, 99)
    assert torch.equal(data.train_x, torch.from_numpy(train).view(12, 3, 32, 32))
    assert torch.equal(data.test_x, torch.from_numpy(written["test"][0]).view(6, 3, 32, 32))
    # statistics of the train split alone (the all-white test image would shift them)
    chans = train.reshape(12, 3, 1024).transpose(1, 0, 2).reshape(3, -1) / 255.0
    assert data.mean == pytest.approx(chans.mean(axis=1).tolist(), abs=1e-6)
    assert data.std == pytest.approx(chans.std(axis=1, ddof=1).tolist(), abs=1e-6)


def test_cifar100_stored_resolution(tmp_path: Path) -> None:
    written = write_cifar(tmp_path)
    data = load("cifar100", root=str(tmp_path), image_size=16)
    assert data.train_x.shape == (12, 3, 16, 16) and data.test_x.shape == (6, 3, 16, 16)
    assert data.train_x.dtype == torch.uint8
    assert (data.test_x[0] == 255).all()  # a uniform image stays exactly uniform
    # antialiased as PIL's bilinear filter is (a plain 2x2 average would differ by tens)
    planes = written["train"][0].reshape(12 * 3, 32, 32)
    pil = np.stack(
        [np.asarray(Image.fromarray(p).resize((16, 16), Image.BILINEAR)) for p in planes]
    )
    assert np.abs(data.train_x.numpy().reshape(36, 16, 16).astype(int) - pil).max() <= 2


def test_cifar100_missing_folder_names_path_and_fix(tmp_path: Path) -> None:
    expected = tmp_path / "nowhere" / "cifar-100-python"
    with pytest.raises(FileNotFoundError) as info:
        load("cifar100", root=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert str(expected) in message and "`root:`" in message and "`download: true`" in message


def test_cifar100_default_root_expands_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert DATASETS.resolve_args("cifar100", {})["root"] == DEFAULT_ROOT
    expected = Path(DEFAULT_ROOT).expanduser() / "cifar-100-python"
    assert str(expected).startswith(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(str(expected))):
        load("cifar100")


def test_cifar100_downloads_only_when_asked_and_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    calls = []

    def fake_cifar100(root: str, download: bool) -> None:
        calls.append((root, download))
        write_cifar(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_cifar100)
    assert load("cifar100", root=str(tmp_path), download=True).num_classes == 3
    assert calls == [(str(tmp_path), True)]
    load("cifar100", root=str(tmp_path), download=True)  # present now: no second fetch
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["train", "test", "meta"])
def test_cifar100_truncated_pickle_names_the_file(tmp_path: Path, name: str) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "cifar-100-python" / name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load("cifar100", root=str(tmp_path))


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}, "3072"),
        ({b"data": np.zeros((2, 3072), np.int64), b"fine_labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0]}, "1 fine_labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 3]}, r"outside \[0, 3\)"),
        ({b"fine_labels": [0, 1]}, "missing key 'data'"),
        ([1, 2, 3], "expected a dict"),
    ],
)
def test_cifar100_wrong_content_names_the_file(
    tmp_path: Path, entry: object, fragment: str
) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + fragment):
        load("cifar100", root=str(tmp_path))


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_cifar100_refuses_pickles_that_call_arbitrary_globals(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(pickle.dumps({b"data": _Exploit(marker), b"fine_labels": []}))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*refusing to load global"):
        load("cifar100", root=str(tmp_path))
    assert not marker.exists()


# --------------------------------------------------------------------------- DTD files

# Made in an unsorted order: class indices must follow the sorted folder names.
DTD_CLASSES = ["zigzagged", "banded", "cracked"]
SIZES = [(40, 30), (30, 52), (64, 64), (33, 47)]  # (width, height): all differ


def _colour(cls: str, j: int) -> tuple[int, int, int]:
    """A solid colour that identifies image j of a class after JPEG and resizing."""
    return (40 + 80 * sorted(DTD_CLASSES).index(cls), 30 + 60 * j, 128)


def write_dtd(root: Path, base: Path | None = None) -> Path:
    """dtd/images/<class>/<class>_<j>.jpg and labels for two splits."""
    folder = base or root / "dtd"
    for cls in DTD_CLASSES:
        (folder / "images" / cls).mkdir(parents=True)
        for j, size in enumerate(SIZES):
            img = Image.new("RGB", size, _colour(cls, j))
            img.save(folder / "images" / cls / f"{cls}_{j}.jpg", quality=95)
    (folder / "labels").mkdir()
    lists = {
        "train1": [0],
        "val1": [1],
        "test1": [2, 3],
        "train2": [2],
        "val2": [3],
        "test2": [0, 1],
    }
    for name, js in lists.items():
        lines = [f"{cls}/{cls}_{j}.jpg" for cls in DTD_CLASSES for j in js]
        (folder / "labels" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return folder


def _identities(x: torch.Tensor, y: torch.Tensor) -> set[tuple[str, int]]:
    """(class, j) of each stored image, read back from its colour."""
    found = set()
    for img, label in zip(x, y, strict=True):
        cls = sorted(DTD_CLASSES)[int(label)]
        rgb = img.float().mean(dim=(1, 2))
        j = int(((rgb[1] - 30) / 60).round())
        assert (rgb - torch.tensor(_colour(cls, j))).abs().max() < 6, "colour of another class"
        found.add((cls, j))
    return found


def test_dtd_splits_follow_the_label_files(tmp_path: Path) -> None:
    write_dtd(tmp_path)
    one = load("dtd", root=str(tmp_path), image_size=16)
    assert one.num_classes == 3 and one.classes == ("banded", "cracked", "zigzagged")
    assert one.train_x.shape == (6, 3, 16, 16) and one.test_x.shape == (6, 3, 16, 16)
    # train = train1 + val1, test = test1; sorted class indices (banded, cracked, zigzagged)
    assert _identities(one.train_x, one.train_y) == {(c, j) for c in DTD_CLASSES for j in (0, 1)}
    assert _identities(one.test_x, one.test_y) == {(c, j) for c in DTD_CLASSES for j in (2, 3)}
    assert one.train_y.tolist() == [2, 0, 1, 2, 0, 1]  # file order: zigzagged, banded, cracked
    two = load("dtd", root=str(tmp_path), image_size=16, split=2)
    assert _identities(two.train_x, two.train_y) == {(c, j) for c in DTD_CLASSES for j in (2, 3)}
    assert _identities(two.test_x, two.test_y) == {(c, j) for c in DTD_CLASSES for j in (0, 1)}
    train_f = one.train_x.float().div(255)
    assert one.mean == pytest.approx(train_f.mean(dim=(0, 2, 3)).tolist(), abs=1e-5)


def test_dtd_resizes_shorter_side_then_centre_crops(tmp_path: Path) -> None:
    folder = write_dtd(tmp_path)
    # thirds green | red | blue: the centre crop of a 3:1 image is the red third only
    wide = np.zeros((30, 90, 3), np.uint8)
    wide[:, :30, 1] = wide[:, 30:60, 0] = wide[:, 60:, 2] = 255
    Image.fromarray(wide).save(folder / "images" / "banded" / "banded_0.jpg", quality=95)
    data = load("dtd", root=str(tmp_path), image_size=16)
    crop = data.train_x[data.train_y.tolist().index(0)].float()  # the first banded image
    assert crop.shape == (3, 16, 16)
    assert crop[0].mean() > 200 and crop[1].mean() < 50 and crop[2].mean() < 50


def test_dtd_reads_torchvisions_nested_layout_and_downloads_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    calls = []

    def fake_dtd(root: str, download: bool) -> None:
        calls.append((root, download))
        write_dtd(Path(root), base=Path(root) / "dtd" / "dtd")

    monkeypatch.setattr(torchvision.datasets, "DTD", fake_dtd)
    with pytest.raises(FileNotFoundError):
        load("dtd", root=str(tmp_path), image_size=16)
    assert calls == []
    data = load("dtd", root=str(tmp_path), image_size=16, download=True)
    assert calls == [(str(tmp_path), True)] and data.num_classes == 3


def test_dtd_missing_root_and_label_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load("dtd", root=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "dtd" / "images") in message and "`root:`" in message
    assert "`download: true`" in message
    folder = write_dtd(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / "labels" / "train3.txt"))):
        load("dtd", root=str(tmp_path), split=3)


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated"])
def test_dtd_bad_listed_image_is_named(tmp_path: Path, damage: str) -> None:
    folder = write_dtd(tmp_path)
    path = folder / "images" / "cracked" / "cracked_3.jpg"  # listed in test1
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"not a jpeg at all")
    else:
        big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
        big.save(path, quality=95)
        path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load("dtd", root=str(tmp_path), image_size=16)


@pytest.mark.parametrize(("damage", "reason"), [("missing", "file missing"), ("garbage", "Error")])
def test_dtd_bad_listed_image_is_skipped_when_asked(
    tmp_path: Path, damage: str, reason: str
) -> None:
    folder = write_dtd(tmp_path)
    path = folder / "images" / "cracked" / "cracked_3.jpg"  # listed in test1
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"not a jpeg at all")
    data = load("dtd", root=str(tmp_path), image_size=16, on_bad_image="skip")
    assert len(data.skipped) == 1 and data.skipped[0].startswith(f"{path}: ")
    assert reason in data.skipped[0]
    assert len(data.train_y) == 6 and len(data.test_y) == 5
    assert ("cracked", 3) not in _identities(data.test_x, data.test_y)


def test_dtd_label_entry_of_unknown_class(tmp_path: Path) -> None:
    folder = write_dtd(tmp_path)
    with (folder / "labels" / "test1.txt").open("a") as f:
        f.write("woven/woven_0001.jpg\n")
    with pytest.raises(ValueError, match="'woven'"):
        load("dtd", root=str(tmp_path), image_size=16)


# --------------------------------------------------------------------------- configs


def test_defaults_are_resolved() -> None:
    assert source_args("dtd", {"fraction": 0.5, "augment": True}) == {
        "root": DEFAULT_ROOT,
        "split": 1,
        "image_size": 224,
        "download": False,
    }
    assert DATASETS.resolve_args("cifar100", {"image_size": 64})["image_size"] == 64


@pytest.mark.parametrize(
    ("name", "args", "fragment"),
    [
        ("cifar100", {"image_size": 4}, "image_size must be >= 8, got 4"),
        ("cifar100", {"root": " "}, "root must be a folder path"),
        ("cifar100", {"download": "yes"}, "'download' must be bool"),
        ("cifar100", {"split": 1}, r"unknown argument\(s\) \['split'\]"),
        ("dtd", {"split": 0}, "split must be in 1..10, got 0"),
        ("dtd", {"split": 11}, "split must be in 1..10, got 11"),
        ("dtd", {"image_size": 2}, "image_size must be >= 8, got 2"),
        ("dtd", {"root": 3}, "'root' must be str"),
    ],
)
def test_bad_config_values(name: str, args: dict, fragment: str) -> None:
    with pytest.raises(RegistryError, match=fragment):
        DATASETS.resolve_args(name, args)


# --------------------------------------------------------------------------- decode cache


def test_decoded_dataset_is_cached_on_disk_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers import data

    write_cifar(tmp_path / "data")
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    args = {"root": str(tmp_path / "data")}
    data.clear_process_cache()
    first = data.load_dataset("cifar100", args)
    path = data.cache_path("cifar100", args)
    assert path.is_file() and path.parent == tmp_path / "cache"
    # a second sweep (a new process: the in-memory cache is empty) does not decode again
    data.clear_process_cache()
    decoded = []
    real_build = data.DATASETS.build
    monkeypatch.setattr(
        data.DATASETS, "build", lambda *a, **k: decoded.append(a) or real_build(*a, **k)
    )
    second = data.load_dataset("cifar100", dict(args, download=False))
    assert decoded == []
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)
    assert (first.num_classes, first.mean, first.std) == (
        second.num_classes,
        second.mean,
        second.std,
    )
    # another resolution is another entry; a damaged entry is decoded again
    assert data.cache_path("cifar100", dict(args, image_size=16)) != path
    path.write_bytes(b"not a tensor file")
    data.clear_process_cache()
    third = data.load_dataset("cifar100", args)
    assert len(decoded) == 1 and torch.equal(third.train_x, first.train_x)
    assert path.stat().st_size > 100  # rewritten
    data.clear_process_cache()


def test_cheap_datasets_are_not_cached_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers import data

    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    data.clear_process_cache()
    data.load_dataset("synthetic", {"num_classes": 2, "images_per_class": 4, "image_size": 8})
    assert not (tmp_path / "cache").exists()
    data.clear_process_cache()
