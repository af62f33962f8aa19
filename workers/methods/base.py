"""What every PEFT method receives and returns; the method registry itself."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from workers.registry import Registry, RegistryError

log = logging.getLogger(__name__)

METHODS = Registry("method")


@dataclass(frozen=True)
class MethodContext:
    """Facts about the trial that a method may need."""

    classifier: str  # dotted name of the head; every method trains it (new classes)
    total_steps: int  # optimizer steps of the trial's schedule (AdaLoRA-style budgets)
    dataset: str = ""  # registry name of the trial's dataset (per-dataset defaults)
    steps_per_epoch: int = 0  # optimizer steps per epoch (0: not known)


@dataclass
class Adapted:
    """A model after a method was applied.

    ``on_optimizer_step(step)`` is called after every optimizer step (steps count
    from 1, gradients still in ``.grad``), for methods whose structure changes during
    training (rank or sparsity allocation). ``regularizer()``, when set, is added to
    the task loss of every training step.
    """

    model: nn.Module
    on_optimizer_step: Callable[[int], None] | None = None
    regularizer: Callable[[], torch.Tensor] | None = None


def is_classifier_param(name: str, classifier: str) -> bool:
    """True for the parameters of the head (also when a wrapper prefixes names)."""
    return name.startswith(classifier + ".") or f".{classifier}." in name


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of model parameters, counting a packed 4-bit weight by its logical shape."""
    total = 0
    for param in model.parameters():
        if trainable_only and not param.requires_grad:
            continue
        state = getattr(param, "quant_state", None)  # bitsandbytes Params4bit
        total += int(torch.Size(state.shape).numel()) if state is not None else param.numel()
    return total


def check_applicable(
    method: str,
    backbone: str,
    method_args: dict | None = None,
    backbone_args: dict | None = None,
) -> None:
    """Raise ``RegistryError`` unless ``method`` applies to ``backbone``.

    What a method needs is read from the backbone's structure (``workers.structure``,
    built on the meta device): its config's ``missing(structure)`` says what is absent.
    A method without ``missing`` but registered with family tags (a plug-in may do so)
    applies to the backbones of those families; one with neither applies to every one.
    """
    from workers.backbones import BACKBONES

    reason = why_not(method, backbone, method_args, backbone_args)
    if reason:
        fits = [b for b in BACKBONES.names() if not why_not(method, b, method_args)]
        raise RegistryError(
            f"method {method!r} does not apply to backbone {backbone!r}: {reason}; "
            f"registered backbones it applies to: {', '.join(fits) or '(none)'}"
        )


def why_not(
    method: str,
    backbone: str,
    method_args: dict | None = None,
    backbone_args: dict | None = None,
) -> str | None:
    """What ``backbone`` lacks for ``method`` (None: the method applies)."""
    from workers.backbones import check_backbone, family

    config = METHODS.make_config(method, method_args)
    structure = check_backbone(backbone, backbone_args)
    missing = getattr(config, "missing", None)
    if missing is not None:
        return missing(structure)
    fits = METHODS.get(method).tags
    if fits and not fits & (structure.families | {family(backbone, backbone_args)}):
        return f"it applies to {' or '.join(sorted(fits))} backbones"
    return None


def apply_method(name: str, args: dict | None, model: nn.Module, ctx: MethodContext) -> Adapted:
    """Apply registered method ``name`` with grid arguments ``args`` to ``model``."""
    adapted = METHODS.build(name, args, model, ctx)
    if count_parameters(adapted.model, trainable_only=True) == 0:
        raise RuntimeError(f"method {name!r} left no trainable parameter")
    return adapted
