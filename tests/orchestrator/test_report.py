"""The report: numbers on a hand-checked sweep, graceful with old records, and the HTML page
opened in headless Chromium (every plot drawn, no console error, a hover names the
configuration, a legend click hides a group, tables fit 1400 px, the findings listed)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator.records import RecordStore
from orchestrator.report import analyse, energy_note, write_report
from orchestrator.report.plots import plots
from tests.orchestrator import browser
from tests.orchestrator.test_findings import EXPECTED, paper_like_records

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
    # the findings come first, each with its trials
    assert md.index("## Findings") < md.index("## How to read this")
    assert "- **digits**: lora vs full: energy +100 %, peak memory" in md
    assert "  - trials: dig00n0, dig00n1, dig00n2, dig00s0, dig00s1, dig00s2, dig01n0" in md
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
    scripts = re.findall(r"<script[^>]*>", page)
    # the data, plotly.js and the page's script, all inline
    assert scripts == ['<script type="application/json" id="report-data">', "<script>", "<script>"]
    # outside the embedded plotly.js bundle (whose strings name its own web site), the
    # page refers to nothing outside itself
    from plotly.offline import get_plotlyjs

    assert get_plotlyjs() in page
    own = page.replace(get_plotlyjs(), "")
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", own)
    assert "<link" not in own and "@import" not in own
    assert "ValueError: bad &lt;shape&gt; &amp; size" in page  # escaped, not markup
    assert own.count("data:image/png;base64,") == 2  # the two PNG figures


def test_plot_specifications_are_valid_plotly_figures() -> None:
    import plotly.graph_objects as go

    figs = plots(analyse(sweep_records()))
    # per dataset: three 2-D views, the 3-D front, parallel coordinates, NetScore
    assert len(figs) == 2 * 6
    for fig in figs:
        go.Figure(fig.figure)  # raises on a property Plotly does not know
    view = next(f for f in figs if f.id == "d1-accuracy_memory")  # digits
    points = [t for t in view.figure["data"] if t.get("customdata")]
    assert sorted(t["name"] for t in points) == ["bitfit", "full", "lora"]
    # checkpointing is the shape, backbone the fill: tiny_vit_test filled, vit_test open
    full = next(t for t in points if t["name"] == "full")
    symbols = full["marker"]["symbol"]
    looks = {tuple(c[:2]): s for c, s in zip(full["customdata"], symbols, strict=True)}
    assert looks == {
        ("tiny_vit_test", "none"): "circle",
        ("tiny_vit_test", "static"): "square",
        ("vit_test", "none"): "circle-open",
        ("vit_test", "static"): "square-open",
    }
    keys = [t["name"] for t in view.figure["data"] if t.get("meta")]
    assert keys == ["bitfit", "full", "lora", "none", "static", "tiny_vit_test", "vit_test"]
    # 6 of the 7 front points are labelled (LABELS_PER_PANEL), the knee among them
    labels = [x for t in points for x in t["text"] if x]
    assert len(labels) == 6 and "vit_test / full / static" in labels  # the knee
    netscore = next(f for f in figs if f.id == "d1-netscore").figure
    axes = sorted(k for k in netscore["layout"] if k.startswith("xaxis"))
    assert len(axes) == 5 and len({t["xaxis"] for t in netscore["data"]}) == 5
    titles = [netscore["layout"][a]["title"]["text"] for a in axes]
    # NetScore-E uses the energy: on digits bitfit's is a share, none is estimated
    assert not any("estimated" in t for t in titles)
    assert "NetScore-E (dB)<br>energy share" in titles and "NetScore (Wong 2018) (dB)" in titles


# ---------------------------------------------------------------- headless Chromium


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's `chromium` (``make test`` installs it); a missing browser fails, never skips."""
    path = browser.chromium()
    if not path:
        pytest.fail(
            "headless Chromium not found: run `make test` (it installs Debian's chromium) or "
            "`apt-get install -y --no-install-recommends chromium`, or set CHROMIUM=/path/to/it"
        )
    return path


@pytest.fixture(scope="module")
def sweep_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    return Path(write_report(sweep_records(), RecordStore(out), "synthetic").html)


@pytest.fixture(scope="module")
def seen(chromium: str, sweep_page: Path) -> dict:
    """The probe on the sweep's page: hover the first point of cifar100's accuracy vs
    memory plot, then click the legend entry ``static``."""
    return browser.probe(sweep_page, plot="d0-accuracy_memory", legend="static")


def test_page_draws_every_plot_without_a_console_error(seen: dict) -> None:
    assert seen["errors"] == []
    shown = [p for p in seen["plots"] if p["shown"]]
    assert [p["id"] for p in shown] == [
        f"plot-d0-{v}"
        for v in (
            "accuracy_memory",
            "accuracy_energy",
            "memory_energy",
            "3d",
            "parallel",
            "netscore",
        )
    ]
    for plot in shown:
        assert plot["drawn"] and plot["height"] > 300, plot
        assert plot["width"] > 1200, plot  # full width at 1400 px
    # the other dataset's plots are drawn when it is chosen, not before
    assert not any(p["drawn"] for p in seen["plots"] if not p["shown"])


def test_hover_names_the_configuration(seen: dict) -> None:
    (text,) = seen["hover"]
    # the probe hovers the first point of the first trace (bitfit's) of cifar100's view
    view = next(p for p in plots(analyse(sweep_records())) if p.id == "d0-accuracy_memory")
    first = view.figure["data"][0]
    config = first["hovertext"][0].split("<br>")[0].removeprefix("<b>").removesuffix("</b>")
    assert first["name"] == "bitfit" and " / bitfit / " in config
    assert text.startswith(config)
    assert "3 ok seed(s) of 3 trial(s)" in text and "accuracy 0." in text and "±" in text


def test_a_legend_click_hides_a_group_in_the_plot(seen: dict) -> None:
    assert seen["legendFound"]
    traces = {t["name"]: t for t in seen["traces"]}
    assert traces["static"]["visible"] == "legendonly" and traces["none"]["visible"] is True
    points = [t for t in seen["traces"] if t["customdata"]]
    assert len(points) == 3
    for trace in points:
        for (_, ckpt, _), x in zip(trace["customdata"], trace["x"], strict=True):
            assert (x is None) == (ckpt == "static"), (trace["name"], ckpt, x)


def test_tables_fit_1400_px(seen: dict) -> None:
    assert seen["scrollWidth"] <= seen["innerWidth"] and seen["wideTables"] == 0


def test_findings_and_a_linked_dataset_in_chromium(chromium: str, tmp_path: Path) -> None:
    page = Path(write_report(paper_like_records(), RecordStore(tmp_path), "paper").html)
    seen = browser.probe(page, plot="d1-accuracy_memory", legend="full", fragment="#dataset=dtd")
    assert seen["errors"] == []
    assert set(EXPECTED) <= set(seen["findings"])
    shown = [p for p in seen["plots"] if p["shown"]]
    assert shown and all(p["id"].startswith("plot-d1-") and p["drawn"] for p in shown)
    # dtd has one configuration: hiding its method hides its trace
    (trace,) = [t for t in seen["traces"] if t["customdata"]]
    assert trace["name"] == "full" and trace["visible"] is False


def test_page_screenshot_is_not_blank(chromium: str, sweep_page: Path) -> None:
    from PIL import Image

    shot = browser.screenshot(sweep_page, sweep_page.parent / "shot.png", height=2600)
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (2600, 1400)
    plots = image[1200:].reshape(-1, 3).astype(int)  # below the findings
    assert (plots.min(axis=1) < 200).mean() > 0.01  # not a white page
    # the methods' colours (tab10 blue, orange, green) are on screen: markers were drawn
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)):
        assert (np.abs(plots - colour).sum(axis=1) < 30).sum() > 20, colour


def test_orchestrate_report_prints_every_file_and_the_findings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.cli import main
    from orchestrator.records import TrialRecord
    from orchestrator.spec import TrialSpec

    store = RecordStore(tmp_path)
    # full: 100 J, 0.9; bitfit: 80 J, 0.88 (one seed each): bitfit -20 % energy, -2 points
    for method, acc, energy in (("full", 0.9, 100.0), ("bitfit", 0.88, 80.0)):
        spec = TrialSpec(backbone="vit_test", method=method)
        store.write(
            TrialRecord(
                spec=spec,
                status="ok",
                accuracy=acc,
                peak_mem_mb=10.0,
                mem_source="accounted",
                energy_j=energy,
                energy_source="rapl",
                train_time_s=1.0,
            )
        )
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("report.html", "report.md", "pareto.png", "netscore.png"):
        assert str(tmp_path / name) in out
    assert "\nFindings:\n- Methods against full fine-tuning: " in out
    assert "bitfit vs full: energy −20 %, peak memory +0.0 %, train time +0.0 %, " in out
    assert "accuracy −2.0 points, over 1 pair" in out and "the pair has one seed" in out
