"""Full fine-tuning: every parameter is trained (the reference point of every sweep)."""

from __future__ import annotations

from torch import nn

from workers.methods.base import METHODS, Adapted, MethodContext
from workers.registry import NoArgs


@METHODS.register(config_cls=NoArgs)
def full(config: NoArgs, model: nn.Module, ctx: MethodContext) -> Adapted:
    """Full fine-tuning of all parameters."""
    for param in model.parameters():
        param.requires_grad_(True)
    return Adapted(model)
