"""Selective recompute at op granularity without a dispatch mode: cheap outputs rebuilt
from the inputs that their own autograd nodes keep anyway.

A ViT block saves, for backward, both the input and the output of its norms and its
GELU: a norm keeps its input (and mean, rstd) for its own backward, the matmul after
it keeps the norm's output; GELU keeps the MLP's hidden activation, ``fc2`` keeps
GELU's output (4x the width). :class:`RecomputePointwise` is a saved-tensor hook: a
tensor that a norm or an activation produced is not kept but replaced by a recipe
holding that op's autograd node, and is recomputed, in backward, from what the node
itself keeps. Nothing the node keeps is held twice; the recompute is one pointwise
op (on ViT-S at 96 px: 38 % fewer saved bytes per block for 1 % more time, where
PyTorch's selective checkpointing costs 15 % in its per-op Python dispatch). The
output of fused attention on the CPU (kept by its own backward and by the projection
after it) is rebuilt the same way from the query, key and value its node keeps: a
short sequence's attention is a small share of a block's time (ViT-S at 96 px: one
more block-width tensor dropped, 44 % fewer saved bytes in all).

Only nodes made inside the hooked region are rebuilt (their creation order is later
than the region input's node), so a region never reaches into another block's graph.
Tensors that are kept go through the hooks that were active around the region (a
memory meter's), so such meters still see them.

Example::

    with RecomputePointwise(x):
        out = block(x)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _layer_norm(node: Any) -> torch.Tensor:
    y = node._saved_input - node._saved_result1  # (x - mean) * rstd * weight + bias,
    y.mul_(node._saved_result2)  # in place: one new tensor, the same roundings
    if node._saved_weight is not None:
        y.mul_(node._saved_weight)
    if node._saved_bias is not None:
        y.add_(node._saved_bias)
    return y


def _flash_attention_cpu(node: Any) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        node._saved_query,
        node._saved_key,
        node._saved_value,
        0.0,  # only nodes without dropout are rebuilt (APPLIES)
        node._saved_is_causal,
        attn_mask=node._saved_attn_mask,
        scale=node._saved_scale,
    )[0]


# autograd node (by class name) -> its first output, from what the node keeps for backward
RECOMPUTE: dict[str, Callable[[Any], torch.Tensor]] = {
    "NativeLayerNormBackward0": _layer_norm,
    "GeluBackward0": lambda node: F.gelu(node._saved_self, approximate=node._saved_approximate),
    "SiluBackward0": lambda node: F.silu(node._saved_self),
    "HardswishBackward0": lambda node: F.hardswish(node._saved_self),
    "ScaledDotProductFlashAttentionForCpuBackward0": _flash_attention_cpu,
}
# nodes rebuilt only when their output is a function of what they keep (no random draws)
APPLIES: dict[str, Callable[[Any], bool]] = {
    "ScaledDotProductFlashAttentionForCpuBackward0": lambda node: node._saved_dropout_p == 0.0,
}


class _Kept:
    __slots__ = ("packed",)

    def __init__(self, packed: Any) -> None:
        self.packed = packed


class _Output:
    """A node's output to rebuild in backward, shared by the saved tensors that are it or
    views of it (attention's output and the projection's input): rebuilt once, held until
    the last of them is unpacked."""

    __slots__ = ("node", "rebuild", "dtype", "size", "stride", "pending", "rebuilt")

    def __init__(self, node: Any, rebuild: Callable, base: torch.Tensor) -> None:
        self.node, self.rebuild, self.dtype = node, rebuild, base.dtype
        self.size, self.stride = tuple(base.shape), tuple(base.stride())
        self.pending = 0  # saved tensors not unpacked yet
        self.rebuilt: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        y = self.rebuilt
        if y is None:
            y = self.rebuild(self.node).to(self.dtype)
            if tuple(y.stride()) != self.stride:
                layout = torch.empty_strided(
                    self.size, self.stride, dtype=self.dtype, device=y.device
                )
                y = layout.copy_(y)
        self.pending -= 1
        self.rebuilt = y if self.pending > 0 else None
        return y


class _Recipe:
    """A saved tensor to rebuild: the output it is (or is a view of) and its layout."""

    __slots__ = ("output", "view")

    def __init__(self, output: _Output, base: torch.Tensor, t: torch.Tensor) -> None:
        output.pending += 1
        self.output = output
        offset = t.storage_offset() - base.storage_offset()
        self.view = None if t is base else (tuple(t.shape), tuple(t.stride()), offset)

    def run(self) -> torch.Tensor:
        y = self.output.get()
        return y if self.view is None else y.as_strided(*self.view)


class RecomputePointwise(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks for one region run on ``x``: norm and activation outputs made
    in the region are recomputed in backward instead of kept."""

    def __init__(self, x: Any) -> None:
        node = getattr(x, "grad_fn", None)
        self._after = node._sequence_nr() if node is not None else -1
        self._outputs: dict[int, _Output] = {}  # by the producing node's sequence number
        # The hooks a tensor saved here would use without this region (a memory meter's):
        # kept tensors go through them. torch.utils.checkpoint reads them the same way;
        # tests/workers/test_checkpoint_pointwise.py fails if this private call moves.
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self._outer_pack, self._outer_unpack = outer if outer is not None else (None, None)
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        base = t if t._base is None else t._base
        node = base.grad_fn
        if node is not None:
            name = type(node).__name__
            rebuild = RECOMPUTE.get(name)
            if (
                rebuild is not None
                and base.output_nr == 0
                and node._sequence_nr() > self._after
                and APPLIES.get(name, _always)(node)
            ):
                key = node._sequence_nr()
                output = self._outputs.get(key)
                if output is None:
                    output = self._outputs[key] = _Output(node, rebuild, base)
                return _Recipe(output, base, t)
        # without an outer hook a kept tensor is itself (no wrapper per saved tensor)
        return _Kept(self._outer_pack(t)) if self._outer_pack else t

    def _unpack(self, packed: Any) -> torch.Tensor:
        if type(packed) is _Recipe:
            return packed.run()
        return self._outer_unpack(packed.packed) if self._outer_unpack else packed


def _always(node: Any) -> bool:
    return True
