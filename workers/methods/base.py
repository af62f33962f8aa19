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


def check_applicable(method: str, backbone: str) -> None:
    """Raise ``RegistryError`` unless ``method`` applies to ``backbone``'s family.

    A method registered without tags applies to every backbone.
    """
    from workers.backbones import BACKBONES, family

    fits = METHODS.get(method).tags
    own = family(backbone)
    if fits and own not in fits:
        suitable = [b for b in BACKBONES.names() if family(b) in fits]
        raise RegistryError(
            f"method {method!r} does not apply to backbone {backbone!r} ({own}); "
            f"it applies to {' or '.join(sorted(fits))} backbones: {', '.join(suitable)}"
        )


def apply_method(name: str, args: dict | None, model: nn.Module, ctx: MethodContext) -> Adapted:
    """Apply registered method ``name`` with grid arguments ``args`` to ``model``."""
    adapted = METHODS.build(name, args, model, ctx)
    if count_parameters(adapted.model, trainable_only=True) == 0:
        raise RuntimeError(f"method {name!r} left no trainable parameter")
    return adapted
