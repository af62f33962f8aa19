"""BitFit: train only the bias terms (and the new head).

Ben Zaken, Goldberg, Ravfogel, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", ACL 2022. https://arxiv.org/abs/2106.10199
peft has no BitFit, so this is ours: a mask over ``requires_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from workers.methods.base import METHODS, Adapted, MethodContext, is_classifier_param


@dataclass(frozen=True)
class BitFitConfig:
    train_norm: bool = False  # also train normalisation weights (a common BitFit variant)


@METHODS.register(config_cls=BitFitConfig)
def bitfit(config: BitFitConfig, model: nn.Module, ctx: MethodContext) -> Adapted:
    """Bias-only fine-tuning (plus the head)."""
    norm_params = set()
    if config.train_norm:
        for module in model.modules():
            if isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.BatchNorm2d):
                norm_params.update(id(p) for p in module.parameters(recurse=False))
    for name, param in model.named_parameters():
        keep = (
            name.endswith(".bias")
            or is_classifier_param(name, ctx.classifier)
            or id(param) in norm_params
        )
        param.requires_grad_(keep)
    return Adapted(model)
