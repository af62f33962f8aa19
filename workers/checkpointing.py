"""Gradient-checkpointing strategies: which blocks recompute their forward in backward.

A backbone's *blocks* are its modules named ``...blocks.<i>`` in forward order (ViT:
``blocks.3``; TinyViT: ``stages.1.blocks.0``). A strategy picks a subset; each chosen
block's ``forward`` is replaced, on that instance only, by a non-reentrant
``torch.utils.checkpoint`` call, so module names (and with them adapters and state
dicts) are untouched and the strategy composes with every PEFT method.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from workers.registry import NoArgs, Registry

log = logging.getLogger(__name__)

CHECKPOINTING = Registry("checkpointing")

_BLOCK_NAME = re.compile(r"(^|\.)blocks\.\d+$")


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's blocks, in forward (registration) order."""
    return [(n, m) for n, m in model.named_modules() if _BLOCK_NAME.search(n)]


class KeepForRecompute(torch.autograd.Function):
    """Identity that saves its input for backward.

    A checkpointed block keeps its input alive (it is needed for the recompute) but
    outside autograd's saved tensors, where memory meters that hook
    ``saved_tensors_hooks`` would not see it. Saving it here costs nothing (one more
    reference to the same storage) and makes that memory visible to such meters.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def checkpoint_block(block: nn.Module) -> None:
    """Make ``block`` recompute its forward during backward (idempotent)."""
    if getattr(block, "_vramsweep_checkpointed", False):
        return
    plain_forward = block.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not (torch.is_grad_enabled() and block.training):
            return plain_forward(x, *args, **kwargs)
        if not x.requires_grad and not any(p.requires_grad for p in block.parameters()):
            # a frozen block below every trained parameter builds no graph: checkpointing
            # it would only keep its input alive
            return plain_forward(x, *args, **kwargs)
        if x.requires_grad:
            x = KeepForRecompute.apply(x)
        return checkpoint(plain_forward, x, *args, use_reentrant=False, **kwargs)

    block.forward = forward
    block._vramsweep_checkpointed = True


def apply_checkpointing(name: str, args: dict | None, model: nn.Module) -> list[str]:
    """Apply strategy ``name`` to ``model``; returns the names of the checkpointed blocks."""
    chosen = CHECKPOINTING.build(name, args, model)
    blocks = dict(find_blocks(model))
    for block_name in chosen:
        checkpoint_block(blocks[block_name])
    log.info("checkpointing %s: %d of %d blocks", name, len(chosen), len(blocks))
    return chosen


@CHECKPOINTING.register(config_cls=NoArgs)
def none(config: NoArgs, model: nn.Module) -> list[str]:
    """No checkpointing: every activation is kept for backward."""
    return []


@dataclass(frozen=True)
class StaticConfig:
    every: int = 1  # checkpoint blocks 0, k, 2k, ... (1 = every block)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")


@CHECKPOINTING.register(config_cls=StaticConfig)
def static(config: StaticConfig, model: nn.Module) -> list[str]:
    """Checkpoint every k-th block, whatever the budget."""
    return [n for i, (n, _) in enumerate(find_blocks(model)) if i % config.every == 0]
