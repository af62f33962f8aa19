"""The GPU acceptance check (benchmarks/gpu_check.py) without a GPU.

Every part runs here, in its own entry point, on the tiny backbones on the CPU; the
packing harness starts real worker processes, each with its own cap; a part is killed
at its limit; the report's schema rejects what it should. The GPU-only branches (NVML
meters and sampling, allocator figures, the peak-rate table) run against a fake
``pynvml`` and fabricated records. The whole command end to end is the slow test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpucheck import part, report, runner
from benchmarks.gpucheck.context import PartContext
from benchmarks.gpucheck.parts import BY_NAME, PARTS, cap, energy, mfu, packing, select
from benchmarks.gpucheck.report import NO_CUDA, Figure, Target
from benchmarks.gpucheck.sizes import GPU, METHOD_ARGS, TINY
from orchestrator.records import TrialRecord
from tests.workers.test_energy import BUS_ID, FakeGpu, fake_nvml
from workers.backbones import BACKBONES
from workers.checkpointing import CHECKPOINTING
from workers.methods import METHODS, check_applicable

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- helpers


def _ctx(tmp_path: Path, device: str = "cpu", tiny: bool = True) -> PartContext:
    return PartContext(
        name="test",
        device=torch.device(device),
        sizes=TINY if tiny else GPU,
        tiny=tiny,
        deadline=time.monotonic() + 600,
        out=tmp_path / "part.json",
    )


def _named(ctx: PartContext) -> dict[str, Figure]:
    return {f.name: f for f in ctx.figures}


def _doc(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A report document around ``parts`` (each planned)."""
    return {
        "schema": report.SCHEMA, "device": "cpu", "tiny": True, "started_at": "t0",
        "ended_at": "t1", "wall_s": 1.0, "budget_s": 420.0, "command": "python3 -m x",
        "provenance": {"git_sha": "abc"}, "environment": {"device_name": "CPU"},
        "plan": [{"part": n, "title": n, "estimate_s": 1, "limit_s": 2} for n in parts],
        "parts": parts, "summary": report.summarise(parts),
    }  # fmt: skip


def _part(*figures: Figure, status: str = "ok", reason: str = "") -> dict[str, Any]:
    return {"status": status, "reason": reason, "figures": [f.to_dict() for f in figures],
            "notes": [], "environment": {}, "wall_s": 1.0, "limit_s": 2.0,
            "log_tail": []}  # fmt: skip


# ---------------------------------------------------------------- report and schema


def test_a_figure_checks_its_target_and_a_skip_says_why() -> None:
    f = Figure.of("ratio", 4.123456789, "x", "wall clock", Target(">=", 4))
    assert (f.value, f.target, f.met) == (4.12346, ">= 4", True)
    assert Figure.of("ratio", 3.9, "x", "wall clock", Target(">=", 4)).met is False
    assert Figure.of("status", "oom", "", "record", Target("==", "ok")).met is False
    skipped = Figure.skip("mfu", NO_CUDA, "of peak", "peak table")
    assert skipped.value is None and skipped.skipped == "skipped: no CUDA"
    assert Figure.skip("x", "bitsandbytes missing").skipped == "skipped: bitsandbytes missing"
    with pytest.raises(TypeError, match="scalar"):
        Figure.of("bad", [1, 2], "", "list")
    with pytest.raises(ValueError, match="op"):
        Target("~", 1)


def test_schema_accepts_a_valid_report_and_names_each_problem() -> None:
    good = _doc({"cap": _part(Figure.of("none.status", "oom", "", "record.status"))})
    assert report.validate(good) == []
    cases = {
        "missing": lambda d: d["parts"].pop("cap"),
        "ok but no figures": lambda d: d["parts"]["cap"].update(figures=[]),
        "without a reason": lambda d: d["parts"]["cap"].update(status="timeout"),
        "is not one of": lambda d: d["parts"]["cap"].update(status="fine"),
        "no source": lambda d: d["parts"]["cap"]["figures"][0].update(source=""),
        "no 'skipped": lambda d: d["parts"]["cap"]["figures"][0].update(value=None),
        "met without a target": lambda d: d["parts"]["cap"]["figures"][0].update(met=True),
        "appears twice": lambda d: d["parts"]["cap"]["figures"].append(
            dict(d["parts"]["cap"]["figures"][0])
        ),
        "not in the plan": lambda d: d["parts"].update(extra=_part(status="skipped", reason="x")),
        "schema is": lambda d: d.update(schema="other/0"),
    }
    for expected, damage in cases.items():
        doc = json.loads(json.dumps(good))
        damage(doc)
        problems = report.validate(doc)
        assert any(expected in p for p in problems), (expected, problems)
    assert report.validate({}) and "missing key 'schema'" in report.validate({})[0]


def test_a_failed_measurement_is_a_missed_target_and_the_part_goes_on(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)

    def broken() -> float:
        raise RuntimeError("one of the variables needed for gradient computation\nmore")

    assert ctx.attempt("Vim-S", broken) is None
    assert ctx.attempt("ViT-S", lambda: 3.0) == 3.0
    error = _named(ctx)["Vim-S.error"]
    assert error.value == "RuntimeError: one of the variables needed for gradient computation"
    assert error.met is False
    written = json.loads(ctx.out.read_text())
    assert [f["name"] for f in written["figures"]] == ["Vim-S.error"]


def test_markdown_lists_every_figure_with_its_source_and_target() -> None:
    doc = _doc({
        "cap": _part(Figure.of("none.status", "oom", "", "run_trial record.status",
                               Target("==", "oom"))),
        "energy": _part(Figure.skip("agreement", NO_CUDA, "of counter", "nvml meters")),
        "mfu": _part(status="timeout", reason="killed at its limit of 30 s"),
    })  # fmt: skip
    text = report.markdown(doc)
    assert "| none.status | oom |  | == oom | yes | run_trial record.status |" in text
    assert "| agreement | skipped: no CUDA | of counter |  |  | nvml meters |" in text
    assert "**timeout**: killed at its limit of 30 s" in text
    assert "| mfu | timeout |" in text


def test_parts_are_selected_in_order_and_unknown_ones_are_named() -> None:
    assert [p.name for p in select("energy,cap")] == ["cap", "energy"]
    assert [p.name for p in select(None)] == [p.name for p in PARTS]
    with pytest.raises(ValueError, match="valid: cap, packing"):
        select("cap,gpu")


# ---------------------------------------------------------------- the command


def test_bad_parts_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--parts", "nope", "--dry-run"]) == 2
    assert "unknown parts ['nope']" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_each_part_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "7 parts, estimated" in out and "budget 7m00s" in out
    for p in PARTS:
        assert f"benchmarks.gpucheck.part {p.name} --out" in out
        assert f"--limit-s {p.limit_s:g}" in out
    assert not (tmp_path / "out").exists()


def test_default_budget_fits_twice_in_the_device_time() -> None:
    """Two whole runs and a machine start inside the device tool's 15 minutes; the GPU
    estimates inside the budget; every tiny limit above its estimate."""
    assert 2 * gpu_check.DEFAULT_BUDGET_S + 60 <= 15 * 60
    assert sum(p.estimate_s for p in PARTS) <= gpu_check.DEFAULT_BUDGET_S
    assert all(p.estimate_s < p.limit_s and p.tiny_estimate_s < p.tiny_limit_s for p in PARTS)


def test_a_spent_budget_skips_every_part_and_still_writes_a_valid_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = gpu_check.main(["--cpu", "--budget-s", "5", "--out", str(tmp_path)])
    assert code == 1  # nothing ran
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report.validate(doc) == []
    assert {p["status"] for p in doc["parts"].values()} == {"skipped"}
    assert all("time budget (5 s)" in p["reason"] for p in doc["parts"].values())
    assert doc["command"] == "python3 -m benchmarks.gpu_check --cpu --budget-s 5 --out " + str(
        tmp_path
    )
    assert "| cap | skipped |" in (tmp_path / "gpu_check.md").read_text()


# A part that writes one figure, starts a worker that ignores SIGTERM, and never ends:
# it outlives any limit whatever the machine's speed (a real part may finish first).
STUCK_PART = """
import json, subprocess, sys, time
out = sys.argv[1]
doc = {"status": "running", "figures": [{"name": "before", "value": 1}], "notes": []}
open(out, "w").write(json.dumps(doc))
code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
subprocess.Popen([sys.executable, "-c", code, out])
time.sleep(600)
"""


def test_a_part_is_killed_at_its_limit_with_its_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        runner, "part_command", lambda p, out, *_: [sys.executable, "-c", STUCK_PART, str(out)]
    )
    result = runner.run_part(BY_NAME["methods"], tmp_path, "cpu", True, limit_s=2.0)
    assert result["status"] == "timeout"
    assert "limit of 2 s" in result["reason"]
    assert result["figures"] == [{"name": "before", "value": 1}]  # measured before: kept
    assert 2.0 <= result["wall_s"] < 2.0 + runner.TERM_GRACE_S
    # The part ended at SIGTERM; its worker, which ignored it, went with the group's SIGKILL.
    time.sleep(0.2)  # the killed worker, reparented, is reaped
    alive = [p for p in Path("/proc").glob("[0-9]*") if str(tmp_path) in _cmdline(p)]
    assert alive == []


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_without_cuda_the_first_part_says_so_and_the_rest_are_skipped(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: this test is about a machine without one")
    code = gpu_check.main(["--parts", "cap,energy", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 1 and report.validate(doc) == []
    assert doc["parts"]["cap"]["status"] == "failed"
    assert "sees no CUDA device" in doc["parts"]["cap"]["reason"]
    assert doc["parts"]["energy"]["status"] == "skipped"
    assert "use --cpu" in doc["parts"]["energy"]["reason"]


# Packages in this environment that the device image does not have (docs/gpu_check.md)
NOT_IN_IMAGE = ("ray", "optuna", "optuna_dashboard", "open_clip", "datasets", "bitsandbytes",
                "mamba_ssm", "causal_conv1d")  # fmt: skip
BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError("not in the device image: " + name, name=name)
sys.meta_path.insert(0, Block())
import benchmarks.gpu_check, benchmarks.gpucheck.part, benchmarks.gpucheck.worker
{imports}
print("imported")
"""


def test_the_check_imports_nothing_the_device_image_lacks() -> None:
    """Every module the check's processes import, with the packages the image lacks made
    unimportable (bitsandbytes is imported by QLoRA's trial alone, when present)."""
    imports = "\n".join(f"import {p.module}" for p in PARTS)
    code = BLOCKER.format(blocked=set(NOT_IN_IMAGE), imports=imports)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=runner.python_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-2000:]


# ---------------------------------------------------------------- sizes of the GPU run


@pytest.mark.parametrize("sizes", [GPU, TINY], ids=["gpu", "tiny"])
def test_every_size_names_a_registered_backbone_and_valid_arguments(sizes: Any) -> None:
    """The GPU sizes never run here: their names and arguments are checked instead."""
    backbones = {
        sizes.cap.backbone,
        sizes.packing.backbone,
        sizes.energy.backbone,
        sizes.mfu.backbone,
        sizes.methods.transformer,
        sizes.methods.cnn,
    }
    backbones |= {m[1] for m in sizes.checkpointing.models} | {m[1] for m in sizes.mamba.models}
    assert backbones <= set(BACKBONES.names())  # fmt: skip
    from benchmarks.gpucheck.parts.methods import CNN_METHODS, TRANSFORMER_METHODS

    for method in TRANSFORMER_METHODS:
        check_applicable(method, sizes.methods.transformer)
    for method in CNN_METHODS:
        check_applicable(method, sizes.methods.cnn)
    for method, args in METHOD_ARGS.items():
        METHODS.make_config(method, args)
    CHECKPOINTING.make_config("adaptive", {"margin_mb": sizes.cap.margin_mb})


# ---------------------------------------------------------------- every part on the CPU


def _run_part(name: str, tmp_path: Path) -> dict[str, Any]:
    """The part's own entry point, in this process, as ``--device cpu --tiny``."""
    threads = torch.get_num_threads()
    out = tmp_path / f"{name}.json"
    try:
        part.main([name, "--out", str(out), "--device", "cpu", "--tiny", "--limit-s", "600"])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert result["status"] == "ok", result["reason"]
    problems = report._part_problems({**result, "wall_s": 0, "limit_s": 0})
    assert problems == []
    return {f["name"]: f for f in result["figures"]}


def _value(figures: dict[str, Any], name: str) -> Any:
    assert figures[name]["skipped"] is None, figures[name]
    return figures[name]["value"]


def _skipped_no_cuda(figures: dict[str, Any], *names: str) -> None:
    for name in names:
        assert figures[name]["skipped"] == NO_CUDA, figures[name]


def test_cap_part_on_cpu(tmp_path: Path) -> None:
    figures = _run_part("cap", tmp_path)
    budget = TINY.cap.budget_mb
    assert _value(figures, "none.status") == "over_budget"  # the accounted cap of a CPU
    assert _value(figures, "none.accounted_peak_mb") > budget
    for strategy in ("static", "adaptive"):
        assert _value(figures, f"{strategy}.status") == "ok"
        assert _value(figures, f"{strategy}.accounted_peak_mb") <= budget
        assert figures[f"{strategy}.accounted_peak_mb"]["met"] is True
    assert _value(figures, "trials_ok_after_none_in_same_process") == 2
    assert _value(figures, "static.plan") == "0/0/0/4/0"  # every block recomputed
    _skipped_no_cuda(figures, "none.cuda_max_reserved_mb", "adaptive.nvml_process_mb",
                     "allocated_after_oom_mb")  # fmt: skip


def test_checkpointing_part_on_cpu(tmp_path: Path) -> None:
    figures = _run_part("checkpointing", tmp_path)
    for label, *_ in TINY.checkpointing.models:
        none = _value(figures, f"{label}.none.activations_mb")
        assert none == pytest.approx(_value(figures, f"{label}.unconstrained_activations_mb"))
        assert _value(figures, f"{label}.adaptive.activations_mb") <= 0.5 * none
        assert _value(figures, f"{label}.static.activations_mb") < none
        assert all(_value(figures, f"{label}.{s}.step_ms") > 0 for s in ("none", "selective"))
        assert figures[f"{label}.adaptive_vs_none"]["target"] is None  # a GPU target only
        _skipped_no_cuda(figures, f"{label}.none.step_peak_mb")
    _skipped_no_cuda(figures, "tiny ViT.compiled.step_ms")


def test_energy_part_on_cpu(tmp_path: Path) -> None:
    figures = _run_part("energy", tmp_path)
    assert _value(figures, "estimate.window_j") > 0
    assert _value(figures, "window_steps") >= 1
    assert "rapl" in figures["rapl.window_j"]["source"]
    _skipped_no_cuda(figures, "agreement", "power_poll_hz", "compute_processes")


def test_mfu_part_on_cpu(tmp_path: Path) -> None:
    figures = _run_part("mfu", tmp_path)
    assert _value(figures, "trial.status") == "ok"
    assert _value(figures, "trial.images_per_s") > 0 and _value(figures, "loop.images_per_s") > 0
    assert _value(figures, "macs_per_image") > 0
    _skipped_no_cuda(figures, "peak_bf16_tflops", "loop.mfu", "trial.mfu")


def test_methods_part_on_cpu(tmp_path: Path) -> None:
    figures = _run_part("methods", tmp_path)
    from benchmarks.gpucheck.parts.methods import CNN_METHODS, TRANSFORMER_METHODS

    for method in TRANSFORMER_METHODS + CNN_METHODS:
        if figures[f"{method}.status"]["skipped"]:  # qlora without bitsandbytes
            assert "bitsandbytes" in figures[f"{method}.status"]["skipped"]
            continue
        assert _value(figures, f"{method}.status") == "ok"
        assert _value(figures, f"{method}.steps") == TINY.methods.steps
        assert figures[f"{method}.loss_decreasing"]["met"] is True, method
        assert 0 < _value(figures, f"{method}.peak_mem_mb") <= TINY.methods.budget_mb


def test_mamba_part_on_cpu(tmp_path: Path) -> None:
    figures = _run_part("mamba", tmp_path)
    assert _value(figures, "mamba_ssm_available") is False
    batch = TINY.mamba.batch
    for label, _ in TINY.mamba.models:
        assert figures[f"{label}.scan_rel_diff"]["met"] is True
        for scan in ("chunked", "reference"):
            assert _value(figures, f"{label}.b{batch}.{scan}.step_ms") > 0
            _skipped_no_cuda(figures, f"{label}.b{batch}.{scan}.step_peak_mb")


@pytest.mark.slow
def test_packing_part_on_cpu(tmp_path: Path) -> None:
    figures = _run_part("packing", tmp_path)
    n = TINY.packing.trials
    assert _value(figures, "packed.trials_ok") == n == _value(figures, "sequential.trials_ok")
    assert _value(figures, "packed.worker_processes") == n
    assert _value(figures, "packed.cap_kind") == "accounted"
    assert _value(figures, "throughput_ratio") > 0
    _skipped_no_cuda(figures, "scheduler.cuda_context_mb", "packed.nvml_sampled_max_process_mb")


def test_packing_harness_starts_workers_each_with_its_own_cap(tmp_path: Path) -> None:
    """Two fresh worker processes at once, as Ray starts them: one trial each, one of them
    under a budget it cannot meet. Each is capped alone."""
    roomy = packing.trials.spec(
        TINY, "cpu", backbone="vit_test", method="lora", batch=16, steps=2, budget_mb=64
    )
    tight = packing.trials.spec(TINY, "cpu", backbone="vit_test", method="lora", batch=16,
                                steps=2, budget_mb=1)  # fmt: skip
    launch = packing._launch([[roomy], [tight]], 1, 0.0, tmp_path, "t", time.monotonic() + 600)
    assert launch.finished
    assert len(set(launch.pids)) == 2 and os.getpid() not in launch.pids
    by_budget = {r.spec.budget_mb: r for r in launch.records}
    assert by_budget[64].status == "ok" and by_budget[64].cap_kind == "accounted"
    assert by_budget[64].peak_mem_mb <= 64
    assert by_budget[1].status == "over_budget"  # its own cap, not the other's
    assert all(s > 0 for s in launch.start_s)
    env = (tmp_path / "t-0.specs").read_text()
    assert roomy.to_json() in env


# ---------------------------------------------------------------- GPU branches, faked


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> FakeGpu:
    """NVML is a fake GPU drawing 150 W whose energy counter runs with the clock; torch's
    CUDA device 0 is an 'NVIDIA H100 80GB HBM3' at the fake's bus id; syncs do nothing."""

    class ClockedGpu(FakeGpu):
        @property
        def energy_mj(self) -> int:
            return int(time.perf_counter() * 150_000)

        @energy_mj.setter
        def energy_mj(self, value: Any) -> None:
            pass

    gpu = ClockedGpu([])
    gpu.processes = [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=900 << 20)]
    module = fake_nvml(gpu)
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3000 << 20)
    module.NVML_CLOCK_SM = 1
    module.nvmlDeviceGetMaxClockInfo = lambda h, clock: 1980
    monkeypatch.setitem(sys.modules, "pynvml", module)
    props = types.SimpleNamespace(
        pci_domain_id=0, pci_bus_id=int(BUS_ID.split(":")[1], 16), pci_device_id=0,
        name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
        total_memory=80 << 30,
    )  # fmt: skip
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return gpu


def test_energy_meters_agree_on_a_fake_gpu(tmp_path: Path, fake_gpu: FakeGpu) -> None:
    ctx = _ctx(tmp_path, "cuda", tiny=False)
    meters = energy._meters(ctx, energy.GPU_METERS, poll_hz=50)
    assert set(meters) == set(energy.GPU_METERS)
    idle = energy._window(meters, lambda: time.sleep(0.1))
    busy = energy._window(meters, lambda: time.sleep(0.5))
    energy._agreement(ctx, busy, idle)
    energy._poll_rate(ctx, meters, busy)
    energy._processes(ctx)
    figures = _named(ctx)
    assert figures["agreement"].met is True and figures["agreement"].target == "<= 0.05"
    assert figures["power_poll_hz"].value >= 10 and figures["power_poll_hz"].met is True
    assert figures["compute_processes"].value == 1 and figures["compute_processes"].met is True
    assert busy["nvml_energy"].exclusive is True  # one process listed at both ends


def test_memory_sampler_keeps_each_process_peak(fake_gpu: FakeGpu) -> None:
    from benchmarks.gpucheck.nvml import MemorySampler

    with MemorySampler(torch.device("cuda"), interval_s=0.01) as sampler:
        time.sleep(0.05)
        fake_gpu.processes = [types.SimpleNamespace(pid=7, usedGpuMemory=2500 << 20),
                              types.SimpleNamespace(pid=8, usedGpuMemory=None)]  # fmt: skip
        time.sleep(0.05)
        fake_gpu.processes = [types.SimpleNamespace(pid=7, usedGpuMemory=100 << 20)]
        time.sleep(0.05)
    assert sampler.error == "" and sampler.samples >= 3
    assert sampler.per_process_mb[7] == 2500 and sampler.per_process_mb[8] == 0
    assert sampler.device_used_mb == 3000


def test_peak_rate_from_the_datasheet_or_the_clock(
    tmp_path: Path, fake_gpu: FakeGpu, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _ctx(tmp_path, "cuda", tiny=False)
    rate, source = mfu.peak_flops(ctx)
    assert rate == 989.4e12 and "datasheet" in source and "'H100'" in source
    props = torch.cuda.get_device_properties()
    props.name = "NVIDIA H100 PCIe"
    assert mfu.peak_flops(ctx)[0] == 756e12
    props.name = "NVIDIA Future GPU"
    rate, source = mfu.peak_flops(ctx)
    assert rate == 132 * 1980e6 * 4096 and "computed: 132 SMs x 1980 MHz" in source
    props.major = 7
    assert mfu.peak_flops(ctx)[0] is None
    assert mfu.peak_flops(_ctx(tmp_path))[1] == NO_CUDA


def _record(**fields: Any) -> TrialRecord:
    spec = packing.trials.spec(GPU, "cuda", backbone="vit_small_patch16_224", method="lora",
                               batch=32, steps=30, budget_mb=2048)  # fmt: skip
    base = dict(status="ok", cap_kind="cuda_allocator", mem_source="cuda_allocator",
                cuda_max_allocated_mb=1500.0, cuda_max_reserved_mb=1900.0,
                nvml_process_mb=2300.0, accounted_peak_mb=1400.0, energy_exclusive=False,
                started_at="2026-01-01T00:00:00.000+00:00",
                ended_at="2026-01-01T00:00:10.000+00:00")  # fmt: skip
    return TrialRecord(spec=spec, **(base | fields))


def test_packing_figures_on_a_fake_gpu(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, "cuda", tiny=False)
    over = _record(cuda_max_reserved_mb=2100.0)  # a cap that did not hold: a missed target
    packed = packing.Launch(
        wall_s=40.0, pids=list(range(8)), start_s=[3.0] * 8,
        records=[_record() for _ in range(7)] + [over], finished=True,
    )  # fmt: skip
    sequential = packing.Launch(200.0, [99], [3.0], [_record()] * 8, True)
    sampler = types.SimpleNamespace(per_process_mb={0: 2400.0, 99: 1.0}, device_used_mb=2e4,
                                    error="")  # fmt: skip
    packing._packed_figures(ctx, packed, 8, 2048, 500.0, sampler)
    packing._throughput(ctx, packed, sequential, 8)
    f = _named(ctx)
    assert f["packed.trials_ok"].met and f["packed.cap_kind"].value == "cuda_allocator"
    assert (
        f["packed.max_cuda_max_reserved_mb"].value == 2100
        and not f["packed.max_cuda_max_reserved_mb"].met
    )
    assert f["packed.nvml_sampled_max_process_mb"].value == 2400  # pid 99 is not a worker
    assert f["packed.nvml_sampled_max_process_mb"].target == "<= 2548"
    assert f["packed.energy_labelled_share"].value is True
    assert f["throughput_ratio"].value == pytest.approx(5.0) and f["throughput_ratio"].met


def test_cap_memory_figures_on_a_fake_gpu_and_on_a_cpu(tmp_path: Path) -> None:
    gpu_ctx, cpu_ctx = _ctx(tmp_path, "cuda", tiny=False), _ctx(tmp_path)
    cap._memory(gpu_ctx, "static", _record(), 2048)
    cap._memory(cpu_ctx, "static", _record(), 2048)
    gpu, cpu = _named(gpu_ctx), _named(cpu_ctx)
    assert gpu["static.cuda_max_reserved_mb"].met is True
    assert gpu["static.nvml_process_mb"].value == 2300 and gpu["static.nvml_process_mb"].met is None
    assert gpu["static.accounted_peak_mb"].target is None  # the allocator caps on a GPU
    assert cpu["static.cuda_max_reserved_mb"].skipped == NO_CUDA
    assert cpu["static.accounted_peak_mb"].met is True


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_the_cpu_check_end_to_end(tmp_path: Path) -> None:
    """The command a GPU machine runs, on the CPU: every part in its own process."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--cpu", "--out", str(tmp_path)],
        cwd=ROOT, env=runner.python_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report.validate(doc) == []
    assert [p["part"] for p in doc["plan"]] == [p.name for p in PARTS]
    text = (tmp_path / "gpu_check.md").read_text()
    for name, result in doc["parts"].items():
        assert result["status"] == "ok" and result["figures"], name
        assert f"## {name}:" in text
        for f in result["figures"]:
            assert f"| {f['name']} |" in text and f["source"].split("|")[0] in text
    assert doc["summary"]["targets_missed"] == 0, text
    assert doc["environment"]["torch"] == torch.__version__
