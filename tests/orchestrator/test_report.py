"""The report: numbers on a hand-checked sweep, graceful with old records, and the HTML page
opened in headless Chromium (plots drawn, no console message, screenshot not blank)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator.records import RecordStore
from orchestrator.report import analyse, energy_note, write_report

BACKBONES = ("vit_test", "tiny_vit_test")
METHODS = ("full", "lora", "bitfit")
CHECKPOINTING = ("none", "static")
DATASETS = ("digits", "cifar100")


def sweep_records(seeds: int = 3) -> pd.DataFrame:
    """A synthetic sweep: 2 datasets x 2 backbones x 3 methods x 2 checkpointing x seeds, plus
    failures. lora on cifar100 has estimated energy; bitfit shared its GPU."""
    rng = np.random.default_rng(0)
    rows = []
    for dataset in DATASETS:
        for bi, backbone in enumerate(BACKBONES):
            for mi, method in enumerate(METHODS):
                for checkpointing in CHECKPOINTING:
                    for seed in range(seeds):
                        mem = (400.0 - 120 * mi) * (0.6 if checkpointing == "static" else 1.0)
                        rows.append(
                            {
                                "trial_id": f"{dataset[:3]}{bi}{mi}{checkpointing[0]}{seed}",
                                "kind": "finetune",
                                "status": "ok",
                                "error": "",
                                "backbone": backbone,
                                "method": method,
                                "baseline": "",
                                "checkpointing": checkpointing,
                                "dataset": dataset,
                                "seed": seed,
                                "budget_mb": 2048.0,
                                "accuracy": 0.9 - 0.1 * mi - 0.05 * bi + rng.normal(0, 0.01),
                                "peak_mem_mb": mem + rng.normal(0, 5),
                                "mem_source": "accounted",
                                "energy_j": 1000.0
                                * (1 + mi)
                                * (1.3 if checkpointing == "static" else 1),
                                "energy_source": "estimated"
                                if (method, dataset) == ("lora", "cifar100")
                                else "nvml_energy",
                                "energy_exclusive": method != "bitfit",
                                "energy_estimated": (method, dataset) == ("lora", "cifar100"),
                                "train_time_s": 10.0 + mi,
                                "params_total": 4e6 * (1 + bi),
                                "params_trainable": 1e5 * (3 - mi),
                                "macs": 9e8,
                                "infer_latency_ms_b1": 5.0 + bi,
                                "infer_peak_mem_mb_b1": 64.0,
                            }
                        )
    failed = {**rows[0], "accuracy": None, "peak_mem_mb": None, "energy_j": None}
    rows += [
        {**failed, "trial_id": "oom0", "status": "oom", "error": "CUDA out of memory", "seed": 8},
        {
            **failed,
            "trial_id": "fail0",
            "status": "failed",
            "seed": 9,
            "error": "Traceback (most recent call last):\n  x\nValueError: bad <shape> & size",
        },
    ]
    return pd.DataFrame(rows)


def test_analysis_of_a_sweep() -> None:
    analysis = analyse(sweep_records())
    assert len(analysis.configs) == 2 * 2 * 3 * 2
    assert set(analysis.configs["seeds"]) == {3}
    assert analysis.datasets == ["cifar100", "digits"]
    assert set(analysis.fronts) == {
        "accuracy_memory",
        "accuracy_energy",
        "memory_energy",
        "accuracy_memory_energy",
    }
    assert not analysis.unavailable and not analysis.scores.skipped
    # NetScore of vit_test / full on digits: seeds share params and MACs, so the mean score
    # is 20 log10(a^2 / (sqrt(4) sqrt(0.9))) averaged over the seeds' accuracies
    records = sweep_records()
    sel = records[
        (records["status"] == "ok")
        & (records["dataset"] == "digits")
        & (records["backbone"] == "vit_test")
        & (records["method"] == "full")
        & (records["checkpointing"] == "none")
    ]
    expected = np.mean(
        [20 * math.log10((100 * a) ** 2 / (2 * math.sqrt(0.9))) for a in sel["accuracy"]]
    )
    row = analysis.configs.set_index("config").loc["vit_test / full / none @ 2048 MiB"]
    row = row[row["dataset"] == "digits"].iloc[0]
    assert row["netscore"] == pytest.approx(expected)
    assert row["energy_note"] == ""
    notes = analysis.configs.set_index(["dataset", "method"])["energy_note"]
    assert set(notes.loc[("cifar100", "lora")]) == {"estimated"}
    assert set(notes.loc[("digits", "bitfit")]) == {"share"}


@pytest.mark.parametrize(
    ("row", "note"),
    [
        ({"energy_source": "nvml_energy", "energy_exclusive": True}, ""),
        ({"energy_source": "estimated", "energy_estimated": True}, "estimated"),
        ({"energy_source": "rapl", "energy_estimated": True}, "estimated"),
        ({"energy_source": "nvml_power,estimated"}, "estimated"),  # seeds of one configuration
        ({"energy_source": "nvml_energy", "energy_exclusive": False}, "share"),
        ({"energy_source": "estimated", "energy_exclusive": False}, "estimated, share"),
        ({"energy_source": "nvml_energy", "energy_exclusive": float("nan")}, ""),  # unknown
        ({}, ""),  # an old record
    ],
)
def test_energy_note(row: dict, note: str) -> None:
    assert energy_note(row) == note


def test_markdown_report(tmp_path: Path) -> None:
    files = write_report(sweep_records(), RecordStore(tmp_path), "synthetic")
    md = Path(files.markdown).read_text()
    for section in ("## Pareto analysis: digits", "## NetScore", "## By method", "## By backbone"):
        assert section in md
    assert "## By checkpointing" in md and "### accuracy, peak memory and energy (3-D)" in md
    # the reference point and hypervolume of every front are written down
    assert md.count("hypervolume") >= 8 and "from the reference point (top-1 accuracy 0" in md
    # estimated and shared energy are labelled where they appear
    assert "(estimated)" in md and "(share)" in md
    # failures are listed with the last line of their error
    assert "| oom0 | oom |" in md and "ValueError: bad <shape> & size" in md
    assert {Path(p).name for p in files.figures} == {"pareto.png", "netscore.png"}
    for png in files.figures:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_old_records_without_the_new_columns(tmp_path: Path) -> None:
    old = sweep_records(seeds=1).drop(
        columns=["energy_exclusive", "infer_latency_ms_b1", "infer_peak_mem_mb_b1", "energy_avg_w"],
        errors="ignore",
    )
    old["energy_j"] = None
    old["energy_source"] = "unavailable"
    old.loc[0, "mem_source"] = "cuda_allocator"
    analysis = analyse(old)
    assert set(analysis.fronts) == {"accuracy_memory"}
    assert set(analysis.unavailable) == {
        "accuracy_energy",
        "memory_energy",
        "accuracy_memory_energy",
    }
    assert set(analysis.scores.skipped) == {
        "netscore_energy",
        "netscore_latency",
        "netscore_infer_mem",
    }
    md = Path(write_report(old, RecordStore(tmp_path), "old").markdown).read_text()
    assert "Not computed: netscore_energy (no energy_j)" in md
    assert "accuracy vs energy: not shown, no value of energy_j" in md
    assert "Peak memory comes from different meters (accounted, cuda_allocator;" in md


def test_html_is_self_contained(tmp_path: Path) -> None:
    page = Path(write_report(sweep_records(), RecordStore(tmp_path), "synthetic").html).read_text()
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", page)
    assert "<link" not in page and "<script src" not in page and "@import" not in page
    assert "ValueError: bad &lt;shape&gt; &amp; size" in page  # escaped, not markup
    assert page.count("data:image/png;base64,") == 2


# ---------------------------------------------------------------- headless Chromium


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's `chromium` (``make test`` installs it); a missing browser fails, never skips."""
    path = (
        os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if not path:
        pytest.fail(
            "headless Chromium not found: run `make test` (it installs Debian's chromium) or "
            "`apt-get install -y --no-install-recommends chromium`, or set CHROMIUM=/path/to/it"
        )
    return path


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    return Path(write_report(sweep_records(), RecordStore(out), "synthetic").html)


def _open(chromium: str, page: Path, fragment: str, *args: str) -> subprocess.CompletedProcess:
    profile = page.parent / f"profile{abs(hash((fragment, args)))}"
    return subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",  # the tests may run as root
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,1000",
            "--hide-scrollbars",
            *args,
            f"{page.as_uri()}{fragment}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def _console(stderr: str) -> list[str]:
    """Every message the page wrote to its console (errors, uncaught exceptions, logs)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.parametrize(
    ("fragment", "dataset", "view", "points", "knees"),
    [
        ("", "cifar100", "accuracy vs peak memory", 12, 1),
        ("#dataset=digits&view=accuracy_energy", "digits", "accuracy vs energy", 12, 1),
        ("#dataset=digits&view=memory_energy&logx=1", "digits", "peak memory vs energy", 12, 1),
    ],
)
def test_page_draws_the_plots_in_chromium(
    chromium: str,
    report_page: Path,
    fragment: str,
    dataset: str,
    view: str,
    points: int,
    knees: int,
) -> None:
    run = _open(chromium, report_page, fragment, "--dump-dom")
    assert _console(run.stderr) == []
    dom = run.stdout
    plot = dom.split('id="plot"', 1)[1].split('id="caption"', 1)[0]
    assert plot.count('class="pt"') == points
    assert plot.count('class="knee"') == knees
    assert plot.count('class="front"') == 1 and plot.count('class="err"') > 0
    # every point names its configuration (the tooltip's text is also the SVG title)
    assert plot.count("<title>") == points and "vit_test / full / none @ 2048 MiB" in plot
    caption = re.search(r'<p id="caption">([^<]*)</p>', dom).group(1)
    assert caption.startswith(f"{dataset}, {view}: ") and "hypervolume" in caption
    assert dom.count("<option") == 2 and dom.count('type="radio"') == 3


def test_page_screenshot_is_not_blank(chromium: str, report_page: Path) -> None:
    from PIL import Image

    shot = report_page.parent / "shot.png"
    run = _open(chromium, report_page, "", f"--screenshot={shot}")
    assert _console(run.stderr) == []
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (1000, 1280)
    plot = image[200:700, :800].reshape(-1, 3).astype(int)  # where the SVG plot lies
    assert (plot.min(axis=1) < 200).mean() > 0.02  # not a white page
    # the methods' colours (tab10 blue, orange, green) are on screen: markers were drawn
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)):
        assert (np.abs(plot - colour).sum(axis=1) < 30).sum() > 20, colour
