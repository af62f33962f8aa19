"""What a backbone is made of: its chain of blocks and the layers methods adapt.

Found from the built model, not declared: any timm architecture (CNN stages,
hierarchical transformers, hybrids) and any module a plug-in registers get the
same treatment as the registered backbones.

The chain of blocks. The registered backbones name their blocks ``...blocks.<i>`` or
``...layers.<i>`` (ViT ``blocks.3``, TinyViT ``stages.1.blocks.0``, MobileNet stages
``blocks.2``, MambaVision ``levels.2.blocks.0``, Vim ``layers.5``); when that rule
finds blocks and none holds another, it is the chain (so those backbones keep the
chain they always had). Otherwise a generic rule walks the module tree: a
*container* is an ``nn.Sequential`` / ``nn.ModuleList``, or a module whose composite
children repeat one class (timm RegNet's ``s1.b1, s1.b2, ...``), never a
``nn.ModuleDict`` (DenseNet's dense blocks stay whole: their layers take lists); a
container whose members hold at least half of its parameters is flattened into its
members, recursively (ResNet ``layer1.0``, Swin ``layers.0.blocks.1``); from the top,
the walk also descends into the one child that holds most of the parameters, the
classification head left aside. What lies between blocks (stems, downsampling) stays
outside the chain: checkpointing plans count it as bytes that are always kept.

Example:
    >>> from workers.backbones import create_backbone
    >>> [n for n, _ in find_blocks(create_backbone("vit_test", num_classes=3))]
    ['blocks.0', 'blocks.1', 'blocks.2', 'blocks.3']
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from torch import nn

_NAMED_BLOCK = re.compile(r"(^|\.)(blocks|layers)\.\d+$")
_SEQUENCES = (nn.Sequential, nn.ModuleList)
MEMBER_SHARE = 0.5  # a container is flattened when its members hold this share of it


CHAIN_ATTR = "_vramsweep_blocks"  # the chain found when the backbone was built


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's chain of blocks, in forward (registration) order.

    A backbone remembers the chain found when it was built (``remember_blocks``), so that
    the chain stays the same after a method wraps its layers (peft adapters add modules
    that the generic rule would otherwise see)."""
    for prefix, module in model.named_modules():
        names = getattr(module, CHAIN_ATTR, None)
        if names is not None:
            return [(_join(prefix, n), module.get_submodule(n)) for n in names]
    return _find(model)


def remember_blocks(model: nn.Module) -> None:
    """Store the chain of ``model`` on it (see ``find_blocks``)."""
    setattr(model, CHAIN_ATTR, tuple(n for n, _ in _find(model)))


def _find(model: nn.Module) -> list[tuple[str, nn.Module]]:
    named = [(n, m) for n, m in model.named_modules() if _NAMED_BLOCK.search(n)]
    names = [n for n, _ in named]
    if named and not any(b.startswith(a + ".") for a in names for b in names):
        return named
    return [(n, m) for n, m in _expand("", model, top=True) if n]


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _composite(module: nn.Module) -> bool:
    """A module made of modules, with parameters (a layer is not a block)."""
    return any(True for _ in module.children()) and any(True for _ in module.parameters())


def _block_like(module: nn.Module) -> bool:
    """A sequence, one that wraps a sequence (Xception's ``block1.rep``), or two composite
    children or more: a block, not a conv-norm-act layer."""
    if isinstance(module, _SEQUENCES):
        return True
    kids = [c for c in module.children() if _composite(c)]
    return len(kids) >= 2 or any(isinstance(c, _SEQUENCES) for c in kids)


def _members(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children a container runs one after the other (empty: not a container).

    A ``nn.ModuleDict`` is never one: its forward, if it has one, may call its members
    on anything (DenseNet's dense layers each take the list of all earlier outputs)."""
    if isinstance(module, nn.ModuleDict):
        return []
    kids = [(n, c) for n, c in module.named_children() if _composite(c)]
    if isinstance(module, _SEQUENCES):
        return kids
    counts = Counter(type(c) for _, c in kids)
    return [(n, c) for n, c in kids if counts[type(c)] >= 2 and _block_like(c)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _head(model: nn.Module) -> set[str]:
    """The children of ``model`` that make up its classification head (timm's
    ``pretrained_cfg['classifier']`` and ``head`` / ``pre_logits``): not the trunk, however
    many parameters a wide pre-classifier layer holds (VGG, CPUBone, HGNetV2)."""
    classifier = str(getattr(model, "pretrained_cfg", {}).get("classifier") or "")
    names = {"head", "pre_logits", classifier.partition(".")[0]}
    return {n for n, _ in model.named_children() if n in names}


def _expand(name: str, module: nn.Module, top: bool = False) -> list[tuple[str, nn.Module]]:
    head = _head(module) if top else set()
    members = [(n, c) for n, c in _members(module) if n not in head]
    total = _params(module) - sum(_params(c) for n, c in module.named_children() if n in head)
    if members and sum(_params(c) for _, c in members) >= MEMBER_SHARE * total:
        return [b for n, c in members for b in _expand(_join(name, n), c)]
    kids = [(n, c) for n, c in module.named_children() if _composite(c) and n not in head]
    if kids:
        n, child = max(kids, key=lambda kid: _params(kid[1]))
        # from the top, the trunk; inside a block, only a container it wraps
        if _params(child) >= MEMBER_SHARE * total and (top or _members(child)):
            inner = _expand(_join(name, n), child, top)
            if len(inner) > 1 or top:
                return inner
    return [(name, module)]


# ---------------------------------------------------------------- what methods adapt


@dataclass(frozen=True)
class Structure:
    """The parts of a model that methods and checkpointing strategies need (names)."""

    blocks: tuple[str, ...]
    linears: tuple[str, ...]  # nn.Linear layers inside the blocks
    # dense (groups == 1), undilated nn.Conv2d layers inside the blocks (peft's Conv2d
    # LoRA ignores dilation: its branch would not match a dilated conv's output)
    convs: tuple[str, ...]
    attention: tuple[str, ...]  # blocks that hold an attention module
    mamba: tuple[str, ...]  # blocks that hold a selective state-space mixer
    # units of timm's MobileNet-style ``blocks.<stage>.<i>`` stages that are inverted
    # residuals (a depthwise convolution and BatchNorm)
    inverted_residual: tuple[str, ...]

    @property
    def families(self) -> frozenset[str]:
        """The backbone families present (a hybrid has several)."""
        from workers.backbones import INVERTED_RESIDUAL, MAMBA, TRANSFORMER

        present = {
            TRANSFORMER: bool(self.attention) and not self.mamba,
            MAMBA: bool(self.mamba),
            INVERTED_RESIDUAL: bool(self.inverted_residual),
        }
        return frozenset(f for f, yes in present.items() if yes)


def describe(model: nn.Module) -> Structure:
    """The ``Structure`` of ``model`` (works on the meta device: only names and types)."""
    blocks = find_blocks(model)
    linears, convs, attention, mamba = [], [], [], []
    for block_name, block in blocks:
        for name, module in block.named_modules():
            full = _join(block_name, name)
            if isinstance(module, nn.Linear):
                linears.append(full)
            elif (
                isinstance(module, nn.Conv2d) and module.groups == 1 and set(module.dilation) == {1}
            ):
                convs.append(full)
        kinds = {type(m).__name__.lower() for m in block.modules()}
        if any("attention" in k or k == "attn" for k in kinds) or _has_qkv(block):
            attention.append(block_name)
        if any("mamba" in k and "mixer" in k for k in kinds):
            mamba.append(block_name)
    inverted = [n for n, unit in mobilenet_units(model) if is_inverted_residual(unit)]
    return Structure(
        tuple(n for n, _ in blocks),
        tuple(linears),
        tuple(convs),
        tuple(attention),
        tuple(mamba),
        tuple(inverted),
    )


def _has_qkv(block: nn.Module) -> bool:
    return any(name.rpartition(".")[2] in ("qkv", "q", "kv") for name, _ in block.named_modules())


def mobilenet_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm's MobileNet-style ``blocks.<stage>.<i>`` units in forward order (empty when
    the model is not built that way: ``blocks`` a sequence of stage sequences)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not all(
        isinstance(s, nn.Sequential) for s in blocks
    ):
        return []
    return [
        (f"blocks.{s}.{i}", unit) for s, stage in enumerate(blocks) for i, unit in enumerate(stage)
    ]


def is_inverted_residual(unit: nn.Module) -> bool:
    """A block with a depthwise convolution and BatchNorm (an IRB in the MobileTL sense)."""
    convs = [m for m in unit.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in unit.modules() if isinstance(m, nn.BatchNorm2d)]
    return bool(norms) and any(c.groups == c.in_channels > 1 for c in convs)
