"""AdaLoRA through peft: SVD-shaped adapters whose ranks are re-allocated while training.

Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning", ICLR 2023. https://arxiv.org/abs/2303.10512

Each target layer gets ``P diag(E) Q`` with ``init_r`` triplets; after every optimizer
step, peft's rank allocator scores the triplets (EMA of sensitivity x uncertainty)
and masks the least important ones until the total budget falls, on a cubic schedule,
to ``target_r`` per layer on average. ``total_step`` is the trial's schedule. The
orthogonality regulariser on P and Q (which peft adds only to models that return a
``.loss``) is returned to the trainer as ``Adapted.regularizer``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workers.methods.base import METHODS, Adapted, MethodContext
from workers.methods.lora import (
    BLOCK_LINEARS,
    check_adapter,
    effective_target,
    missing_targets,
)
from workers.methods.peft_import import import_peft
from workers.structure import Structure


@dataclass(frozen=True)
class AdaloraArgs:
    """Defaults from the AdaLoRA paper (init_r 12 -> target_r 8, beta 0.85, gamma 0.1)."""

    init_r: int = 12  # triplets per layer at the start
    target_r: int = 8  # average triplets per layer kept at the end (the budget)
    alpha: float = 16.0  # scaling of the update (peft's lora_alpha)
    dropout: float = 0.0  # dropout on the adapter's input
    warmup_fraction: float = 0.1  # share of the steps before pruning starts (t_init)
    final_fraction: float = 0.2  # share of the steps with the final ranks frozen (t_final)
    delta_t: int = 1  # re-allocate every delta_t steps
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of the uncertainty
    orth_reg_weight: float = 0.1  # gamma: weight of ||P^T P - I|| + ||Q Q^T - I||
    target: str = BLOCK_LINEARS  # regular expression over module names (full match)

    def __post_init__(self) -> None:
        if self.init_r < 1:
            raise ValueError(f"init_r must be >= 1, got {self.init_r}")
        if not 1 <= self.target_r <= self.init_r:
            raise ValueError(f"target_r must be in [1, init_r={self.init_r}], got {self.target_r}")
        check_adapter(self.alpha, self.dropout, self.target)
        for key in ("warmup_fraction", "final_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if self.warmup_fraction + self.final_fraction >= 1.0:
            raise ValueError(
                "warmup_fraction + final_fraction must be < 1 (no step would prune), got "
                f"{self.warmup_fraction} + {self.final_fraction}"
            )
        if self.delta_t < 1:
            raise ValueError(f"delta_t must be >= 1, got {self.delta_t}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")

    def missing(self, structure: Structure) -> str | None:
        return missing_targets(structure, self.target)


def orthogonality(model: nn.Module) -> torch.Tensor:
    """Mean over adapter factors of ||P^T P - I||_F (Q: ||Q Q^T - I||_F), as in the paper."""
    terms = []
    for name, param in model.named_parameters():
        if not param.requires_grad or not (".lora_A." in name or ".lora_B." in name):
            continue
        cov = param @ param.T if ".lora_A." in name else param.T @ param
        terms.append(torch.linalg.matrix_norm(cov - torch.eye(len(cov), device=cov.device)))
    return torch.stack(terms).mean()


@METHODS.register(config_cls=AdaloraArgs)
def adalora(config: AdaloraArgs, model: nn.Module, ctx: MethodContext) -> Adapted:
    """AdaLoRA on the blocks' qkv/proj/fc1/fc2 (peft), rank budget over the trial's steps."""
    peft = import_peft()

    total = max(ctx.total_steps, 2)
    tinit = int(config.warmup_fraction * total)
    tfinal = int(config.final_fraction * total)
    peft_config = peft.AdaLoraConfig(
        init_r=config.init_r,
        target_r=config.target_r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=config.delta_t,
        beta1=config.beta1,
        beta2=config.beta2,
        orth_reg_weight=config.orth_reg_weight,
        total_step=total,
        target_modules=effective_target(model, config.target),
        modules_to_save=[ctx.classifier],
    )
    peft_model = peft.get_peft_model(model, peft_config)

    def on_optimizer_step(step: int) -> None:
        # peft scores the triplets from .grad, which the trainer clears only before
        # the next backward
        peft_model.base_model.update_and_allocate(step)

    def regularizer() -> torch.Tensor:
        return config.orth_reg_weight * orthogonality(peft_model)

    return Adapted(
        peft_model,
        on_optimizer_step=on_optimizer_step,
        regularizer=regularizer if config.orth_reg_weight > 0 else None,
    )
