"""Where the Mamba ops run: the fused CUDA kernels when installed, PyTorch otherwise.

The official Vim and MambaVision codes call mamba-ssm's fused selective scan and
causal-conv1d's depthwise causal convolution, CUDA-only packages (the optional ``gpu``
extra: ``pip install -e .[gpu]`` on a machine with a CUDA toolchain). Here they are
optional: ``scan_implementation`` and ``conv_implementation`` pick, per device, the
fused kernel when its package imports, else the pure-PyTorch path (``workers.mamba.scan``
and ``nn.Conv1d``). Every projection stays a module call outside these kernels, so
PEFT wrappers of the linear layers apply on both paths; the scan's operands pass through
a ``ScanInputs`` module (an identity) so that post-training quantization can reach them.

mamba-ssm: https://github.com/state-spaces/mamba
causal-conv1d: https://github.com/Dao-AILab/causal-conv1d
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from workers.mamba.scan import selective_scan_chunked

log = logging.getLogger(__name__)

ScanFn = Callable[..., torch.Tensor]
ConvFn = Callable[[nn.Conv1d, torch.Tensor], torch.Tensor]

FUSED_SCAN = ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
FUSED_CAUSAL_CONV = ("causal_conv1d", "causal_conv1d_fn")


@functools.cache
def optional_kernel(module: str, name: str) -> Callable | None:
    """``module.name`` if it imports (once per process), else None.

    A CUDA extension built for another torch, or imported without CUDA, fails with
    more than ImportError: any such failure means "not available here".
    """
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, OSError, RuntimeError) as exc:
        log.info("%s.%s not available (%s): using the PyTorch path", module, name, exc)
        return None


def scan_implementation(device: torch.device) -> ScanFn:
    """The selective scan for tensors on ``device``: mamba-ssm's ``selective_scan_fn`` on
    CUDA when installed, else ``selective_scan_chunked`` (same arguments and layout)."""
    if device.type == "cuda":
        fused = optional_kernel(*FUSED_SCAN)
        if fused is not None:
            return fused
    return selective_scan_chunked


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The selective scan (see ``workers.mamba.scan``) on the implementation of ``u``'s
    device. ``A``, ``D`` and ``delta_bias`` must be fp32, as the fused kernel requires."""
    scan = scan_implementation(u.device)
    return scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)


class ScanInputs(nn.Module):
    """The selective scan's input-dependent operands at their call site: an identity.

    ``u`` and ``delta`` (batch, dim, length), ``B`` and ``C`` (batch, state, length), as
    the mixer hands them to ``selective_scan``. It holds no parameters (state dicts are
    unchanged); post-training quantization replaces it by a module that rounds the
    operands to int8 (``workers.quantization.QuantScanInputs``), and calibration observes
    them through its forward hooks.
    """

    def forward(
        self, u: torch.Tensor, delta: torch.Tensor, B: torch.Tensor, C: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return u, delta, B, C


def _conv_module(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    # the module pads kernel_size - 1 steps on both sides: the first `length` outputs
    # are the causal ones
    return F.silu(conv(x)[..., : x.shape[-1]])


def conv_implementation(device: torch.device) -> ConvFn:
    """SiLU(depthwise causal convolution) of (batch, dim, length) for ``device``:
    causal-conv1d's kernel on CUDA when installed, else the ``nn.Conv1d`` module."""
    if device.type == "cuda":
        fused = optional_kernel(*FUSED_CAUSAL_CONV)
        if fused is not None:
            return lambda conv, x: fused(x, conv.weight.squeeze(1), conv.bias, activation="silu")
    return _conv_module


def causal_conv1d_silu(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """SiLU(``conv``(x)) made causal, on the implementation of ``x``'s device."""
    return conv_implementation(x.device)(conv, x)
