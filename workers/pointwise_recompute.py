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
PyTorch's selective checkpointing costs 15 % in its per-op Python dispatch).

``matmul=True`` also rebuilds the outputs of linear layers (``addmm``/``mm``) and of
fused attention on the CPU from the inputs their nodes keep: in a ViT block the
query/key/value projection (kept by attention), attention's output (kept by itself and
by the projection after it) and the MLP's hidden activation (kept by GELU), 8 of the 10
widths the pointwise mode keeps, for two matmuls and one attention again in backward.
That is a smaller step than recomputing the whole block (whose checkpoint stops before
``fc2`` but re-runs the projection and the norms) at a slightly lower cost per byte
freed, so a plan can fit a budget more tightly (ViT-S at 96 px, one block, CPU time
over ``pointwise``: 6.9 MiB freed for 10.5-12 ms, a whole recompute 7.8 MiB for
14.5-16 ms).

Only nodes made inside the hooked region are rebuilt (their creation order is later
than the region input's node), so a region never reaches into another block's graph.
Tensors that are kept go through the hooks that were active around the region (a
memory meter's), so such meters still see them. A rebuilt output is shared by the
saved tensors that are it or views of it (query, key and value: one matmul), and one
read while another output is rebuilt from it (GELU's input, read to rebuild GELU's
output) is held until its own node unpacks it: each is computed once per backward.

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


# autograd node (by class name) -> its output, from what the node keeps for backward
RECOMPUTE: dict[str, Callable[[Any], torch.Tensor]] = {
    "NativeLayerNormBackward0": _layer_norm,
    "GeluBackward0": lambda node: F.gelu(node._saved_self, approximate=node._saved_approximate),
    "SiluBackward0": lambda node: F.silu(node._saved_self),
    "HardswishBackward0": lambda node: F.hardswish(node._saved_self),
}


def _addmm(node: Any) -> torch.Tensor:
    bias = node.next_functions[0][0].variable
    mat1, mat2 = node._saved_mat1, node._saved_mat2
    with torch.autocast(mat1.device.type, enabled=False):  # as the forward ran it
        return torch.addmm(bias, mat1, mat2, beta=node._saved_beta, alpha=node._saved_alpha)


def _mm(node: Any) -> torch.Tensor:
    mat1, mat2 = node._saved_self, node._saved_mat2
    with torch.autocast(mat1.device.type, enabled=False):
        return torch.mm(mat1, mat2)


def _flash_attention_cpu(node: Any) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        node._saved_query,
        node._saved_key,
        node._saved_value,
        0.0,  # only nodes without dropout are rebuilt (MATMUL_APPLIES)
        node._saved_is_causal,
        attn_mask=node._saved_attn_mask,
        scale=node._saved_scale,
    )[0]


def _unsafe_view(node: Any) -> torch.Tensor:
    """A linear layer on a batch of tokens: the matmul's 2-D output (reshaped by the caller)."""
    inner = node.next_functions[0][0]
    return MATMUL[type(inner).__name__](inner)


def _needs(node: Any, *inputs: int) -> bool:
    """Whether ``node`` keeps its saved inputs: it does for an input when the *other*
    one needs a gradient (a frozen weight: no input kept, nothing to rebuild from)."""
    return all(node.next_functions[i][0] is not None for i in inputs)


def _addmm_applies(node: Any) -> bool:
    bias = node.next_functions[0][0]
    return type(bias).__name__ == "AccumulateGrad" and _needs(node, 1, 2)


def _unsafe_view_applies(node: Any) -> bool:
    inner = node.next_functions[0][0] if node.next_functions else None
    applies = MATMUL_APPLIES.get(type(inner).__name__)
    return applies is not None and applies(inner)


# the matmul mode's recipes: linear layers' outputs, rebuilt from their input and weight
MATMUL: dict[str, Callable[[Any], torch.Tensor]] = {
    "AddmmBackward0": _addmm,
    "MmBackward0": _mm,
    "UnsafeViewBackward0": _unsafe_view,
    "ScaledDotProductFlashAttentionForCpuBackward0": _flash_attention_cpu,
}
MATMUL_APPLIES: dict[str, Callable[[Any], bool]] = {
    "AddmmBackward0": _addmm_applies,
    "MmBackward0": lambda node: _needs(node, 0, 1),
    "UnsafeViewBackward0": _unsafe_view_applies,
    "ScaledDotProductFlashAttentionForCpuBackward0": lambda node: node._saved_dropout_p == 0.0,
}


class _Kept:
    __slots__ = ("packed",)

    def __init__(self, packed: Any) -> None:
        self.packed = packed


class _Output:
    """A node's output to rebuild in backward, shared by the saved tensors that are it or
    views of it: rebuilt once, held until the last of them is unpacked. Read while
    another output is rebuilt (``nested``), it is held for its own unpack."""

    __slots__ = ("node", "rebuild", "dtype", "size", "stride", "pending", "rebuilt")

    def __init__(self, node: Any, rebuild: Callable, base: torch.Tensor) -> None:
        self.node, self.rebuild, self.dtype = node, rebuild, base.dtype
        self.size, self.stride = tuple(base.shape), tuple(base.stride())
        self.pending = 0  # saved tensors not unpacked yet
        self.rebuilt: torch.Tensor | None = None

    def get(self, nested: bool) -> torch.Tensor:
        y = self.rebuilt if self.rebuilt is not None else self._build()
        if not nested:
            self.pending -= 1
        self.rebuilt = y if nested or self.pending > 0 else None
        return y

    def _build(self) -> torch.Tensor:
        y = self.rebuild(self.node).to(self.dtype)
        if tuple(y.shape) != self.size and y.is_contiguous():
            y = y.view(self.size)  # a linear layer's 2-D matmul, its output's shape
        if tuple(y.stride()) != self.stride:
            layout = torch.empty_strided(self.size, self.stride, dtype=self.dtype, device=y.device)
            y = layout.copy_(y)
        return y


class _Recipe:
    """A saved tensor to rebuild: the output it is (or is a view of) and its layout."""

    __slots__ = ("output", "view")

    def __init__(self, output: _Output, base: torch.Tensor, t: torch.Tensor) -> None:
        output.pending += 1
        self.output = output
        offset = t.storage_offset() - base.storage_offset()
        self.view = None if t is base else (tuple(t.shape), tuple(t.stride()), offset)

    def run(self, nested: bool) -> torch.Tensor:
        y = self.output.get(nested)
        return y if self.view is None else y.as_strided(*self.view)


class RecomputePointwise(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks for one region run on ``x``: norm and activation outputs made
    in the region (and with ``matmul=True`` linear layers' outputs) are recomputed in
    backward instead of kept."""

    def __init__(self, x: Any, matmul: bool = False) -> None:
        node = getattr(x, "grad_fn", None)
        self._after = node._sequence_nr() if node is not None else -1
        self._recipes = RECOMPUTE | MATMUL if matmul else RECOMPUTE
        self._outputs: dict[int, _Output] = {}  # by the producing node's sequence number
        self._rebuilding = 0  # outputs being rebuilt now (a read inside one is nested)
        # The hooks a tensor saved here would use without this region (a memory meter's):
        # kept tensors go through them. torch.utils.checkpoint reads them the same way;
        # tests/workers/test_checkpoint_pointwise.py fails if this private call moves.
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self._outer_pack, self._outer_unpack = outer if outer is not None else (None, None)
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        base = t if t._base is None else t._base
        node = base.grad_fn
        output = self._output(node, base) if node is not None else None
        if output is not None:
            return _Recipe(output, base, t)
        # without an outer hook a kept tensor is itself (no wrapper per saved tensor)
        return _Kept(self._outer_pack(t)) if self._outer_pack else t

    def _output(self, node: Any, base: torch.Tensor) -> _Output | None:
        """The shared output to rebuild ``base`` from, or None: keep it."""
        key = node._sequence_nr()
        output = self._outputs.get(key)
        if output is not None:
            return output
        name = type(node).__name__
        rebuild = self._recipes.get(name)
        # (a first output only: the other outputs of a norm, its mean and rstd, are kept)
        if rebuild is None or base.output_nr != 0 or key <= self._after:
            return None
        if name in MATMUL and not (MATMUL_APPLIES[name](node) and self._inside(node)):
            return None
        output = self._outputs[key] = _Output(node, rebuild, base)
        return output

    def _inside(self, node: Any) -> bool:
        """A linear layer's reshape and its matmul were both made in the region."""
        if type(node).__name__ != "UnsafeViewBackward0":
            return True
        return node.next_functions[0][0]._sequence_nr() > self._after

    def _unpack(self, packed: Any) -> torch.Tensor:
        if type(packed) is _Recipe:
            self._rebuilding += 1
            try:
                return packed.run(nested=self._rebuilding > 1)
            finally:
                self._rebuilding -= 1
        return self._outer_unpack(packed.packed) if self._outer_unpack else packed
