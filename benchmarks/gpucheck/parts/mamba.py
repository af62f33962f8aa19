"""The Mamba backbones on the device: our chunked selective scan against the step-by-step
reference, inside Vim-S and MambaVision-T.

Forward + backward (cross-entropy, no optimizer) at ``batch`` in the check's precision:
median step time and the allocator's step peak with each scan; a scan that runs out of
memory is a figure (``oom``) and both are measured again at ``fallback_batch``. The two
scans' outputs inside the model (fp32, no autocast) must agree. mamba-ssm is not expected
on the device; when it imports, the models would use its fused kernel by default, so
the chunked scan is forced here either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from unittest import mock

import torch

from benchmarks.gpucheck import steps
from benchmarks.gpucheck.context import PartContext
from benchmarks.gpucheck.report import Target
from workers.backbones import create_backbone, input_size
from workers.mamba import kernels
from workers.mamba.scan import selective_scan_chunked, selective_scan_reference

SCANS = {"chunked": selective_scan_chunked, "reference": selective_scan_reference}
TIME = "median wall time of forward + backward (synchronised, warm-up excluded)"
PEAK = "torch.cuda.max_memory_allocated during one step minus allocated before it"
AGREE = 1e-3  # largest |chunked - reference| scan output, relative to the largest output


def run(ctx: PartContext) -> None:
    fused = kernels.optional_kernel(*kernels.FUSED_SCAN) is not None
    ctx.figure(
        "mamba_ssm_available",
        fused,
        "",
        "workers.mamba.kernels.optional_kernel (mamba_ssm.ops.selective_scan_interface imports)",
    )
    for label, backbone in ctx.sizes.mamba.models:
        ctx.attempt(label, lambda label=label, backbone=backbone: _model(ctx, label, backbone))
        steps.free_cuda()


@contextmanager
def using(scan: Callable[..., torch.Tensor]) -> Iterator[None]:
    """The models' selective scan is ``scan`` while the block runs."""
    with mock.patch.object(kernels, "scan_implementation", lambda device: scan):
        yield


def _model(ctx: PartContext, label: str, backbone: str) -> None:
    s = ctx.sizes.mamba
    _agreement(ctx, label, backbone)
    for batch in (s.batch, s.fallback_batch):
        ms = {
            name: _measure(ctx, f"{label}.b{batch}.{name}", backbone, batch, scan)
            for name, scan in SCANS.items()
        }
        if all(ms.values()):
            ctx.figure(
                f"{label}.b{batch}.chunked_speedup",
                ms["reference"] / ms["chunked"],
                "x",
                "reference step time / chunked step time, same process",
            )
            return


def _measure(
    ctx: PartContext, name: str, backbone: str, batch: int, scan: Callable[..., torch.Tensor]
) -> float | None:
    """Step time (ms) of ``backbone`` with ``scan``; None when it ran out of memory (or of
    the part's time)."""
    if ctx.out_of_time(f"{name}.step_ms", "ms", TIME, need_s=10):
        return None
    try:
        ms, peak = _timed(ctx, backbone, batch, scan)
    except torch.OutOfMemoryError as exc:
        error = str(exc).splitlines()[0][:100]
        ctx.figure(f"{name}.status", "oom", "", f"torch.OutOfMemoryError: {error}")
        return None
    finally:
        steps.free_cuda()  # the step's model and tensors went with _timed's frame
    ctx.figure(f"{name}.step_ms", ms, "ms", TIME)
    ctx.cuda_figure(f"{name}.step_peak_mb", peak, "MiB", PEAK)
    return ms


def _timed(
    ctx: PartContext, backbone: str, batch: int, scan: Callable[..., torch.Tensor]
) -> tuple[float, float | None]:
    """(median step ms, allocator step peak MiB) of forward + backward with ``scan``."""
    s = ctx.sizes.mamba
    with using(scan):
        step = steps.training_step(backbone, batch, ctx.device, ctx.sizes.precision)
        step.optimizer = None  # forward + backward only
        ms = steps.median_ms(steps.seconds(step, ctx.device, s.steps, warmup=s.warmup))
        return ms, steps.step_peak_mb(step, ctx.device)


def _agreement(ctx: PartContext, label: str, backbone: str) -> None:
    """Every scan call of one fp32 forward of two images, run with both scans: the largest
    difference of their outputs relative to the largest output of the reference."""
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=steps.NUM_CLASSES).to(ctx.device).eval()
    size = input_size(model)
    x = torch.randn(2, 3, size, size, device=ctx.device)
    diffs, scales = [], []

    def both(*args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        chunked = selective_scan_chunked(*args, **kwargs)
        reference = selective_scan_reference(*args, **kwargs)
        diffs.append((chunked - reference).abs().max().item())
        scales.append(reference.abs().max().item())
        return chunked

    with torch.no_grad(), using(both):
        model(x)
    ctx.figure(
        f"{label}.scan_rel_diff",
        max(diffs) / max(max(scales), 1e-12),
        "of max |output|",
        f"fp32 forward of 2 images: chunked vs reference output of each of its "
        f"{len(diffs)} scan calls",
        Target("<=", AGREE),
    )
