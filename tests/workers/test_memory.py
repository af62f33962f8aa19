"""Memory meters (exact on hand-computed cases) and the CUDA cap boundary."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from workers import memory


def test_activation_meter_counts_saved_inputs_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 50, bias=False), nn.ReLU())
    x = torch.randn(32, 100)
    meter = memory.ActivationMeter(model)
    with meter:
        model(x).sum().backward()
    # linear saves its input (32x100 fp32); relu saves its output (32x50 fp32);
    # the weight is a parameter and is not counted
    assert meter.peak_bytes == 32 * 100 * 4 + 32 * 50 * 4


def test_activation_meter_counts_a_shared_storage_once() -> None:
    holder = nn.Linear(1, 1)
    x = torch.randn(4, 10, requires_grad=True)
    meter = memory.ActivationMeter(holder)
    with meter:
        (x * x).sum().backward()  # mul saves x as both operands: one storage
    assert meter.peak_bytes == 4 * 10 * 4


def test_peak_is_the_largest_forward() -> None:
    model = nn.Linear(10, 10)
    meter = memory.ActivationMeter(model)
    for n in (8, 32, 16):
        with meter:
            model(torch.randn(n, 10)).sum().backward()
    assert meter.peak_bytes == 32 * 10 * 4


def test_account_after_an_adamw_step() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    acc = memory.account(model, opt, activations_bytes=1000, batch_bytes=24)
    trainable_bytes = (64 * 8 + 8) * 4
    assert acc.params_bytes == ((64 * 64 + 64) + (64 * 8 + 8)) * 4
    assert acc.grads_bytes == trainable_bytes
    # two moments per trainable parameter, plus a scalar step counter per tensor
    assert 2 * trainable_bytes <= acc.optimizer_bytes <= 2 * trainable_bytes + 2 * 8
    assert acc.peak_bytes == (acc.params_bytes + acc.grads_bytes + acc.optimizer_bytes + 1000 + 24)


def test_cuda_cap_fraction_at_the_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path, exercised against a fake 8 GiB device."""
    calls: dict[str, object] = {}

    class Props:
        total_memory = 8 * 1024**3

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    monkeypatch.setattr(
        torch.cuda,
        "set_per_process_memory_fraction",
        lambda f, d: calls.__setitem__("fraction", f),
    )
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda d: calls.__setitem__("reset", d)
    )
    assert memory.cap_cuda_memory(2048, torch.device("cuda", 0)) == pytest.approx(0.25)
    assert calls["fraction"] == pytest.approx(0.25) and calls["reset"] == torch.device("cuda", 0)
    assert memory.cap_cuda_memory(64 * 1024, torch.device("cuda", 0)) == 1.0


def test_allocator_config_respects_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    memory.configure_cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    memory.configure_cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64"


class _FakeNvml:
    """The few pynvml calls the meter makes, over one fake GPU with two processes."""

    class NVMLError(Exception):
        pass

    def __init__(self, pid: int, fail: bool = False) -> None:
        self.pid, self.fail, self.bus_ids, self.shutdowns = pid, fail, [], 0

    def nvmlInit(self) -> None:  # noqa: N802
        if self.fail:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlDeviceGetHandleByPciBusId(self, bus_id: str) -> str:  # noqa: N802
        self.bus_ids.append(bus_id)
        return "handle"

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list:  # noqa: N802
        proc = type("Proc", (), {})
        other, mine = proc(), proc()
        other.pid, other.usedGpuMemory = self.pid + 1, 999 * 1024**2
        mine.pid, mine.usedGpuMemory = self.pid, 612 * 1024**2
        return [other, mine]


def test_nvml_process_memory_at_the_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    class Props:
        pci_domain_id, pci_bus_id, pci_device_id = 0, 0x3B, 0

    fake = _FakeNvml(pid=4242)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    device = torch.device("cuda", 0)
    assert memory.nvml_process_mb(device, pid=4242) == pytest.approx(612.0)
    assert fake.bus_ids == ["00000000:3B:00.0"] and fake.shutdowns == 1
    assert memory.nvml_process_mb(device, pid=1) is None  # not listed: no figure
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(pid=4242, fail=True))
    assert memory.nvml_process_mb(device, pid=4242) is None  # no driver: no figure


def test_nvml_without_a_gpu_gives_no_figure() -> None:
    """The real pynvml without a driver must not raise (CI machines have no GPU)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this checks the driverless case")
    assert memory.nvml_process_mb(torch.device("cuda", 0)) is None


def test_cuda_peaks_read_the_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 300 * 1024**2)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 320 * 1024**2)
    monkeypatch.setattr(
        torch.cuda, "memory_stats", lambda d: {"requested_bytes.all.peak": 290 * 1024**2}
    )
    peaks = memory.cuda_peaks(torch.device("cuda", 0))
    assert peaks == {
        "cuda_max_allocated_mb": 300.0,
        "cuda_max_reserved_mb": 320.0,
        "cuda_max_requested_mb": 290.0,
    }


def test_last_bytes_follow_the_last_forward_and_peak_the_largest() -> None:
    lin = nn.Linear(16, 16)
    meter = memory.ActivationMeter(lin)
    with meter:
        lin(torch.randn(64, 16, requires_grad=True))
    with meter:
        lin(torch.randn(4, 16, requires_grad=True))
    assert meter.last_bytes == 4 * 16 * 4
    assert meter.peak_bytes == 64 * 16 * 4


def test_excluded_tensor_is_not_counted() -> None:
    lin = nn.Linear(16, 16)
    x = torch.randn(8, 16, requires_grad=True)
    meter = memory.ActivationMeter(lin, exclude=[x])
    with meter:
        lin(x)
    assert meter.peak_bytes == 0
