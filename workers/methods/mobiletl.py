"""MobileTL: fine-tune the top inverted residual blocks at a fraction of their activation memory.

Chiang, Frumkin, Liang, Marculescu, "MobileTL: On-device Transfer Learning with
Inverted Residual Blocks", AAAI 2023. https://arxiv.org/abs/2212.03246

An inverted residual block (IRB) runs expand 1x1 conv -> BN -> act -> depthwise conv
-> BN -> act -> [squeeze-excite] -> project 1x1 conv -> BN [+ input] (timm's
``InvertedResidual``; ``DepthwiseSeparableConv`` is the same without the expansion).
Trained the ordinary way it keeps, besides every conv input, the input of each BN
(scale gradient, batch statistics) and of each activation. For the ``top_k`` blocks
nearest the output MobileTL keeps only the conv inputs, the output norm's input and
1-bit masks:

- *inner norms* (after the expansion and the depthwise conv) keep their scale and
  running statistics frozen and train their shift: a fixed per-channel affine map
  whose backward is a multiply by a constant (``FrozenStatsNormAct``), whatever
  ``model.train()`` says;
- the block's *output norm* (after the projection; no activation follows it) trains
  scale and shift and updates its running statistics from batch statistics, as the
  paper does to adapt the block's output distribution to the target data;
- *activations* (ReLU6, hard-swish, ReLU, also squeeze-excite's ReLU) compute their
  exact forward; their backward multiplies by a 0/1 mask of the input, saved packed
  8 per byte (``StepGradActivation``):
  ReLU: 1[x > 0], its exact derivative;
  ReLU6: 1[0 < x < 6], its exact derivative, at the same memory (``relu6_mask:
  exact``); ``relu6_mask: signed`` is the step 1[x > 0] (also passing gradient above
  6), the paper's abstract's "signed function" for both activations;
  hard-swish: the step 1[x > 0] in place of its derivative (0 below -3, (2x + 3) / 6
  on [-3, 3], 1 above), as the paper states: it "approximates the backward computation
  of the activation layer (e.g., Hard-Swish and ReLU6) as a signed function which
  enables storing a binary mask" (its abstract; a ramp cannot be kept in one bit;
  whether the step includes x = 0 is not said there, and is immaterial);
- every convolution (expansion, depthwise, projection, squeeze-excite) trains in full.

Below the top-k blocks everything is frozen, BN included (frozen statistics whatever
the mode) and, with nothing requiring grad, builds no graph.
Everything above the last block (V3's final 1x1 ConvBnAct, the conv head, V2's head
BN, the classifier) trains the ordinary way: gradients must cross it anyway.

``top_k`` counts blocks as the paper does (timm's ``blocks.<stage>.<i>`` units that
have a depthwise conv), not the stages that checkpointing calls blocks.

Trainable parameters, over the top-k blocks B (P_above: every parameter above them):

    T = sum_{b in B} [ sum_{conv in b} (c_out * c_in / groups * k_h * k_w + c_out * bias)
                       + sum_{inner norms in b} C + 2 * C_out(b) ] + P_above

e.g. a MobileNetV2 block c -> h = e c -> o with a 3x3 depthwise conv: h c + 9 h + o h +
2 h + 2 o; squeeze-excite to r channels adds 2 h r + r + h. ``vanilla`` (the paper's
FT-BLKs baseline) also trains the inner scales: + sum_{inner norms} C.

Trial ids: ``relu6_mask`` (its default, the exact mask, changes MobileNetV2's gradients)
changed the ids of every mobiletl trial resolved before it existed.

Example:
    >>> model = create_backbone("mobilenetv3_test", num_classes=10)
    >>> ctx = MethodContext(classifier=classifier_name(model), total_steps=100)
    >>> adapted = apply_method("mobiletl", {"top_k": 3}, model, ctx)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.methods.base import METHODS, Adapted, MethodContext, is_classifier_param
from workers.registry import RegistryError
from workers.structure import Structure, is_inverted_residual, mobilenet_units

log = logging.getLogger(__name__)

RELU6_MASKS = ("exact", "signed")


@dataclass(frozen=True)
class MobileTLArgs:
    """MobileTL arguments; ``top_k`` defaults to the paper's headline setting."""

    # blocks fine-tuned, counted from the output; 5 is the setting the paper's abstract
    # reports for MobileNetV3 (-36% FLOPs, -0.6% accuracy on CIFAR10)
    top_k: int = 5
    # True: the paper's FT-BLKs baseline: the same blocks and layers trained the
    # ordinary way (inner BN scales and batch statistics, exact activation backward)
    vanilla: bool = False
    # ReLU6's 1-bit backward mask: "exact" 1[0 < x < 6] or "signed" 1[x > 0] (the abstract)
    relu6_mask: str = "exact"

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.relu6_mask not in RELU6_MASKS:
            raise ValueError(
                f"relu6_mask must be one of {', '.join(RELU6_MASKS)}, got {self.relu6_mask!r}"
            )

    def missing(self, structure: Structure) -> str | None:
        found = len(structure.inverted_residual)
        if not found:
            return "it needs timm MobileNet-style inverted-residual blocks (blocks.<stage>.<i>)"
        if self.top_k > found:
            return f"top_k={self.top_k} exceeds its {found} inverted residual blocks"
        return None


# ---------------------------------------------------------------- 1-bit masks

_BIT_SHIFTS = (7, 6, 5, 4, 3, 2, 1, 0)  # first element in the most significant bit (numpy's order)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8, 8 elements per byte (``ceil(n / 8)`` bytes, flat)."""
    bits = mask.reshape(-1).to(torch.uint8)
    bits = F.pad(bits, (0, -bits.numel() % 8)).view(-1, 8)
    shifts = torch.tensor(_BIT_SHIFTS, dtype=torch.uint8, device=mask.device)
    return (bits << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``pack_bits``: the boolean tensor of ``shape``."""
    shifts = torch.tensor(_BIT_SHIFTS, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(-1)[: math.prod(shape)].view(shape).bool()


class _StepGrad(torch.autograd.Function):
    """``fn(x)`` forward; backward ``grad * gate(x)`` from a packed 1-bit mask."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        fn: Callable[[torch.Tensor], torch.Tensor],
        gate: Callable[[torch.Tensor], torch.Tensor],
    ) -> Any:
        ctx.shape = x.shape
        ctx.save_for_backward(pack_bits(gate(x)))
        return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (packed,) = ctx.saved_tensors
        return grad.masked_fill(~unpack_bits(packed, ctx.shape), 0), None, None


# the activations MobileTL replaces, by module type, as out-of-place functions (an
# in-place activation would overwrite the Function's input)
_ACTIVATIONS: dict[type[nn.Module], Callable[[torch.Tensor], torch.Tensor]] = {
    nn.ReLU: F.relu,
    nn.ReLU6: F.relu6,
    nn.Hardswish: F.hardswish,
}


def _positive(x: torch.Tensor) -> torch.Tensor:
    return x > 0


def _inside_relu6(x: torch.Tensor) -> torch.Tensor:
    return (x > 0) & (x < 6)  # where ReLU6's derivative is 1 (autograd's too)


class StepGradActivation(nn.Module):
    """An activation whose backward keeps one bit per element: where it passes gradient."""

    def __init__(self, act: nn.Module, relu6_mask: str = "exact") -> None:
        super().__init__()
        self.kind = type(act).__name__
        self.fn = _ACTIVATIONS[type(act)]
        exact_relu6 = isinstance(act, nn.ReLU6) and relu6_mask == "exact"
        self.gate = _inside_relu6 if exact_relu6 else _positive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _StepGrad.apply(x, self.fn, self.gate)
        return self.fn(x)

    def extra_repr(self) -> str:
        return f"{self.kind}, mask {'0 < x < 6' if self.gate is _inside_relu6 else 'x > 0'}"


# ---------------------------------------------------------------- frozen-statistics norms


class FrozenStatsNormAct(nn.Module):
    """A BatchNorm fixed to its running statistics: the same affine map in every mode.

    ``act(drop(x * s + bias - running_mean * s))`` with ``s = weight / sqrt(running_var
    + eps)``: with ``weight`` frozen, the backward to ``x`` multiplies by ``s`` and the
    shift's gradient is a sum, so no activation is saved, and ``train()`` changes
    nothing. ``weight`` and ``bias`` stay parameters (whether they train is the
    method's choice) and names match the BatchNorm's, so state dicts load both ways.
    """

    def __init__(self, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        if norm.weight is None or norm.running_mean is None or norm.running_var is None:
            raise ValueError(f"{norm}: MobileTL needs an affine BatchNorm with running statistics")
        self.num_features = norm.num_features
        self.eps = norm.eps
        self.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(norm.bias.detach().clone())
        self.register_buffer("running_mean", norm.running_mean.detach().clone())
        self.register_buffer("running_var", norm.running_var.detach().clone())
        self.drop = getattr(norm, "drop", nn.Identity())  # timm's BatchNormAct2d parts
        self.act = getattr(norm, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return self.act(self.drop(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, frozen statistics"


# ---------------------------------------------------------------- the method


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm's ``blocks.<stage>.<i>`` units in forward order, with their names."""
    found = mobilenet_units(model)
    if not found:
        raise RegistryError(
            "method 'mobiletl' needs a timm MobileNet-style model (stages of blocks under "
            f"`blocks`), got {type(model).__name__}"
        )
    return found


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _freeze_norms(model: nn.Module, prefixes: list[str]) -> None:
    """Every BatchNorm under ``prefixes`` to frozen statistics."""
    for name, module in list(model.named_modules()):
        under = any(name == p or name.startswith(p + ".") for p in prefixes)
        if under and isinstance(module, nn.BatchNorm2d):
            _replace(model, name, FrozenStatsNormAct(module))


def make_memory_efficient(block: nn.Module, relu6_mask: str = "exact") -> None:
    """Frozen-statistics inner norms and 1-bit activation backward in ``block`` (in place).

    The inner norms' scales stop training; the last norm (the block's output norm)
    is left as it is.
    """
    norms = [n for n, m in block.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for name in norms[:-1]:
        norm = FrozenStatsNormAct(block.get_submodule(name))
        _replace(block, name, norm)
    acts = [n for n, m in block.named_modules() if type(m) in _ACTIVATIONS]
    for name in acts:
        _replace(block, name, StepGradActivation(block.get_submodule(name), relu6_mask))


@METHODS.register(config_cls=MobileTLArgs)
def mobiletl(config: MobileTLArgs, model: nn.Module, ctx: MethodContext) -> Adapted:
    """MobileTL: top-k inverted residual blocks with shift-only inner BN and 1-bit activations."""
    named = units(model)
    irbs = [i for i, (_, unit) in enumerate(named) if is_inverted_residual(unit)]
    if config.top_k > len(irbs):
        raise RegistryError(
            f"method 'mobiletl': top_k={config.top_k} exceeds the {len(irbs)} inverted "
            f"residual blocks of {type(model).__name__}; use top_k <= {len(irbs)}"
        )
    first = irbs[-config.top_k]
    children = [name for name, _ in model.named_children()]
    stem = children[: children.index("blocks")]
    above = children[children.index("blocks") + 1 :]  # final conv, head norm, classifier

    _freeze_norms(model, stem + [name for name, _ in named[:first]])
    model.requires_grad_(False)
    for i, (_, unit) in enumerate(named[first:], start=first):
        if i in irbs and not config.vanilla:
            make_memory_efficient(unit, config.relu6_mask)
        unit.requires_grad_(True)
        for norm in unit.modules():
            if isinstance(norm, FrozenStatsNormAct):
                norm.weight.requires_grad_(False)  # the inner norms train their shift only
    for name in above:
        model.get_submodule(name).requires_grad_(True)
    for name, param in model.named_parameters():
        if is_classifier_param(name, ctx.classifier):
            param.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "mobiletl: %d of %d blocks tuned%s, %d trainable parameters",
        config.top_k,
        len(irbs),
        " (vanilla)" if config.vanilla else "",
        trainable,
    )
    return Adapted(model)
