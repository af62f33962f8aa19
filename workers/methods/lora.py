"""LoRA through peft: low-rank adapters on the blocks' attention and MLP projections.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
https://arxiv.org/abs/2106.09685

peft matches a *list* of target names by suffix, which would also wrap the patch
embedding's ``proj`` convolution; a regular expression anchored on ``blocks.N.`` (Vim:
``layers.N.``) adapts only the blocks' linear layers: attention and MLP projections of
transformer blocks, the input/x/dt/output projections of Mamba mixers. On a model whose
layer names that default does not know (any timm architecture), it means every linear
layer inside the model's blocks (``workers.structure``); ``convs: true`` adds the blocks'
dense convolutions (peft's Conv2d LoRA), for CNNs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from workers.methods.base import METHODS, Adapted, MethodContext
from workers.methods.peft_import import import_peft
from workers.structure import Structure, describe

# Every linear layer of the blocks. timm ViT: blocks.3.attn.qkv; TinyViT:
# stages.1.blocks.0.mlp.fc2; Vim: layers.3.mixer.x_proj_b (the forward and backward
# branches' in/x/dt/out projections); MambaVision: levels.2.blocks.0.mixer.dt_proj (Mamba
# mixer), levels.2.blocks.5.mixer.qkv (attention), levels.3.blocks.1.mlp.fc1.
BLOCK_LINEARS = (
    r".*(blocks|layers)\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2)"
    r"|mixer\.(qkv|proj|in_proj|x_proj(_b)?|dt_proj(_b)?|out_proj))"
)


def targets_of(structure: Structure, target: str, convs: bool = False) -> list[str]:
    """The layers of the blocks that ``target`` adapts: the linears whose names it fully
    matches (the default target: every linear of the blocks when it matches none), and
    with ``convs`` the dense convolutions (the default target: all of them)."""
    pattern = re.compile(target)
    default = target == BLOCK_LINEARS
    names = [n for n in structure.linears if pattern.fullmatch(n)]
    if not names and default:
        names = list(structure.linears)
    if convs:
        names += [n for n in structure.convs if default or pattern.fullmatch(n)]
    return names


def effective_target(model: nn.Module, target: str, convs: bool = False) -> str:
    """The regular expression an adapter method hands to peft for ``model``: ``target``
    as given, unless it is the default and names no layer of ``model`` (or ``convs``
    adds convolutions): then exactly the layers ``targets_of`` finds."""
    pattern = re.compile(target)
    if not convs and (
        target != BLOCK_LINEARS
        or any(isinstance(m, nn.Linear) and pattern.fullmatch(n) for n, m in model.named_modules())
    ):
        return target
    names = targets_of(describe(model), target, convs)
    return "|".join(re.escape(n) for n in names) if names else target


def missing_targets(structure: Structure, target: str, convs: bool = False) -> str | None:
    """Why an adapter method cannot apply to a model of ``structure`` (None: it can).
    A target of the user's own is checked when the trial builds (it may name layers
    outside the blocks)."""
    if target != BLOCK_LINEARS or targets_of(structure, target, convs):
        return None
    if structure.convs and not convs:
        return "its blocks have no linear layer (only convolutions: set `convs: true` for lora)"
    return "its blocks have no linear layer to adapt"


def check_target(target: str) -> None:
    """Reject a ``target`` that is not a regular expression (every adapter method's)."""
    try:
        re.compile(target)
    except re.error as exc:
        raise ValueError(f"target is not a valid regular expression: {target!r} ({exc})") from None


def check_adapter(alpha: float, dropout: float, target: str) -> None:
    """The checks shared by the LoRA family (lora, qlora, adalora)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    check_target(target)


@dataclass(frozen=True)
class LoraArgs:
    LATER_FIELDS: ClassVar[tuple[str, ...]] = ("convs",)

    r: int = 8  # rank of the update
    alpha: float = 16.0  # scaling: the update is multiplied by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input
    target: str = BLOCK_LINEARS  # regular expression over module names (full match)
    convs: bool = False  # also adapt the blocks' dense convolutions (peft's Conv2d LoRA)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        check_adapter(self.alpha, self.dropout, self.target)

    def missing(self, structure: Structure) -> str | None:
        return missing_targets(structure, self.target, self.convs)


@METHODS.register(config_cls=LoraArgs)
def lora(config: LoraArgs, model: nn.Module, ctx: MethodContext) -> Adapted:
    """LoRA on the blocks' linear layers (qkv/proj/fc1/fc2, Mamba projections; peft), head
    trained in full."""
    peft = import_peft()

    peft_config = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=effective_target(model, config.target, config.convs),
        modules_to_save=[ctx.classifier],
    )
    return Adapted(peft.get_peft_model(model, peft_config))
