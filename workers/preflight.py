"""The least memory a trial needs, predicted on the meta device before anything is allocated.

A trial whose weights, input batch and largest single activation already exceed its
budget cannot fit whatever its checkpointing does: it ends as ``over_budget`` at once,
instead of allocating until the node's out-of-memory killer stops the worker (a 30,000 px
input would ask for hundreds of GB). The three figures are a lower bound: each of them
is alive at some instant of a training step, together with the others.

Example:
    >>> least = least_memory(TrialSpec(backbone="vit_test"), num_classes=10)  # doctest: +SKIP
    >>> least.total_bytes > least.weights_bytes
    True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from orchestrator.spec import TrialSpec
from workers.backbones import input_size, meta_backbone

log = logging.getLogger(__name__)

# Methods that store the frozen weights in fewer bits than the backbone's own: their
# weights are not part of the bound.
QUANTIZING_METHODS = frozenset({"qlora"})
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class LeastMemory:
    weights_bytes: int  # parameters and buffers of the backbone
    batch_bytes: int  # one training batch at the model's input size
    activation_bytes: int  # the largest single tensor a forward produces (0: not known)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.batch_bytes + self.activation_bytes

    def describe(self) -> str:
        mib = 1 << 20
        return (
            f"least memory predicted before allocating: weights {self.weights_bytes / mib:.1f}"
            f" + batch {self.batch_bytes / mib:.1f} + largest activation "
            f"{self.activation_bytes / mib:.1f} MiB"
        )


def least_memory(spec: TrialSpec, num_classes: int) -> LeastMemory:
    """The lower bound of ``spec``'s memory (see the module doc)."""
    model = meta_backbone(spec.backbone, spec.backbone_args, num_classes)
    tensors = [*model.parameters(), *model.buffers()]
    weights = 0 if spec.method in QUANTIZING_METHODS else sum(_bytes(t) for t in tensors)
    size = input_size(model)
    dtype_bytes = DTYPE_BYTES.get(spec.train.precision, 4)
    batch = spec.train.batch_size * 3 * size * size * dtype_bytes
    return LeastMemory(weights, batch, _largest_activation(model, spec, size, dtype_bytes))


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _largest_activation(model: nn.Module, spec: TrialSpec, size: int, dtype_bytes: int) -> int:
    """The largest output of any module in a meta forward of one batch, at the bytes per
    element the trial computes in (0 when the model cannot run on the meta device)."""
    largest = [0]

    def hook(module: nn.Module, args: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel() * min(dtype_bytes, output.element_size()))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.device("meta"), torch.no_grad():
            model.eval()(torch.empty(spec.train.batch_size, 3, size, size))
    except Exception as exc:  # noqa: BLE001 - data-dependent code (.item()) needs real data
        log.info("largest activation of %s not predicted: %s", spec.backbone, exc)
    finally:
        for handle in handles:
            handle.remove()
    return largest[0]
