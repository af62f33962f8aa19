"""LBP-WHT: back-propagation through the blocks' linear layers in a low-rank WHT space.

Yang, Chiang, Li, Marculescu, Marculescu, "Efficient Low-rank Backpropagation for
Vision Transformer Adaptation", NeurIPS 2023. https://arxiv.org/abs/2309.15275
(authors' code: github.com/SLDGroup/LBP-WHT ``custom_op/linear_wht.py``; ours is a
re-implementation whose defaults give the same gradients).

The forward of every target linear layer is exact. For backward it keeps only the
projection of its input onto a few 2-D Walsh-Hadamard bases over the token grid;
backward projects the output gradient onto the same bases and computes

- grad W = sum over bases of (projected grad y)^T (projected x): exact when every
  basis is kept, a low-pass approximation otherwise;
- grad x = the projected grad y times W, mapped back to the tokens (as the paper);
- grad b = grad y summed over tokens: exact (it needs no activation).

Token grid. The patch tokens are tiled by square blocks of ``block`` x ``block``
tokens (the paper: 8 x 8); a grid smaller than a block uses the next power of two
above its longer side instead (a 4 x 4 grid: 4 x 4 blocks). Extra tokens before the
grid (a ViT's class token) are kept in full and back-propagated exactly. A grid that
is not a multiple of the block (ViT-S/16 at 224: 14 x 14; TinyViT's 7 x 7 windows) is
padded, as ``padding`` says:

- ``reflect`` (default, the authors' ``LinearWHTOp``): x and grad y are reflected
  about the grid's edges, centred (top/left get the larger half); the padded tokens
  count in grad W and their part of grad x is dropped. Equal to the authors' operator
  to 1e-5 relative (tests/fixtures/official/lbp_wht.pt); even with every basis kept
  the gradients are not exact on such grids.
- ``zero``: zeros at the bottom and right; padded tokens add nothing to grad W, so
  "all bases => exact gradients" holds. Closer to the exact gradient, not the paper's.

Changing the default to ``reflect`` changed the trial ids of existing lbp_wht grids.

Where the grid comes from, per layer (the first whose token count matches wins):
the attention module's fixed window (TinyViT ``attn.resolution``), the enclosing
block's channels-last input (TinyViT blocks get ``(B, H, W, C)``: the MLP's grid),
the model's patch grid after its prefix tokens (timm ViT ``patch_embed.grid_size``
and ``num_prefix_tokens``). A layer whose tokens match none is back-propagated
exactly, and logged once.

Trainable set (closed form): the weight and bias of every target linear, the
``nn.LayerNorm`` weights and biases inside the blocks (``train_norms``; trained
exactly), and the head:
``sum_linear (out*in + out) + sum_blockLN 2*dim + head``. Everything else (patch
embedding, position embedding, class token, convolutions, attention-bias tables,
norms outside the blocks) is frozen. The authors' "full" runs train every
parameter with LBP-WHT on the linears; we keep the parts LBP-WHT is about.

Example:
    >>> adapted = apply_method("lbp_wht", {"order": 4}, model, ctx)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.checkpointing import find_blocks
from workers.methods.base import METHODS, Adapted, MethodContext, is_classifier_param
from workers.methods.lora import BLOCK_LINEARS, check_target, effective_target
from workers.structure import Structure

log = logging.getLogger(__name__)

SELECTIONS = ("l1", "linf")
PADDINGS = ("reflect", "zero")


@dataclass(frozen=True)
class LbpWhtArgs:
    # Low-pass order: keep the 2-D bases (i, j) (sequency indices) with i + j < order.
    # 4 = the paper's LP_L1-4 (10 of the 64 bases of an 8 x 8 block); its tables and
    # the authors' example script compare LP_L1-2, -4 and -8. A large order keeps
    # every basis (exact gradients).
    order: int = 4
    block: int = 8  # side of the square WHT block tiled over the token grid (paper: 8)
    selection: str = "l1"  # "l1": i + j < order (the paper's); "linf": max(i, j) < order
    train_norms: bool = True  # also train the blocks' LayerNorms (exact), as the paper does
    target: str = BLOCK_LINEARS  # regular expression over module names (full match)
    # How a grid that is not a multiple of the block is padded: "reflect" (centred, the
    # authors' code) or "zero" (bottom/right; exact when every basis is kept)
    padding: str = "reflect"

    def __post_init__(self) -> None:
        if self.order < 1:
            raise ValueError(f"order must be >= 1, got {self.order}")
        if self.block < 2 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two >= 2, got {self.block}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        check_target(self.target)

    def missing(self, structure: Structure) -> str | None:
        if structure.mamba or not structure.attention:
            return "it needs attention blocks over a token grid (a vision transformer)"
        return None


# ---------------------------------------------------------------- WHT bases


@functools.lru_cache(maxsize=64)
def walsh_bases(side: int, order: int, selection: str = "l1") -> torch.Tensor:
    """The selected 2-D Walsh bases of a ``side`` x ``side`` block, shape (k, side, side).

    Entries are +-1 (each basis has squared norm ``side**2``); basis (i, j) is the
    outer product of the 1-D Walsh functions with i and j sign changes, and bases
    come in the order of (i, j). ``side`` is a power of two. Do not modify the result
    (it is cached).
    """
    walsh = torch.ones(1, 1, dtype=torch.float64)
    while walsh.shape[0] < side:  # Sylvester construction, then sort rows by sequency
        walsh = torch.cat([torch.cat([walsh, walsh], 1), torch.cat([walsh, -walsh], 1)], 0)
    changes = (walsh[:, 1:] != walsh[:, :-1]).sum(dim=1)
    walsh = walsh[torch.argsort(changes)]
    keep = [
        (i, j)
        for i in range(side)
        for j in range(side)
        if (i + j if selection == "l1" else max(i, j)) < order
    ]
    return torch.stack([torch.outer(walsh[i], walsh[j]) for i, j in keep])


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class TokenGrid:
    """How a layer's N tokens are laid out: ``prefix`` extra tokens, then h x w row-major."""

    prefix: int
    h: int
    w: int

    @property
    def tokens(self) -> int:
        return self.prefix + self.h * self.w


def _pads(n: int, side: int, padding: str) -> tuple[int, int]:
    """(before, after) padding of a grid side of ``n`` tokens to a multiple of ``side``."""
    total = -n % side
    before = (total + 1) // 2 if padding == "reflect" else 0  # the authors' ceil(total / 2)
    return before, total - before


def can_reflect(grid: TokenGrid, side: int) -> bool:
    """Whether reflection fits (each pad shorter than the grid side it reflects)."""
    return all(max(_pads(n, side, "reflect")) < n for n in (grid.h, grid.w))


def _to_blocks(t: torch.Tensor, grid: TokenGrid, side: int, padding: str) -> torch.Tensor:
    """(Z, h*w, C) grid tokens -> (Z, nH, side, nW, side, C), padded as ``padding`` says."""
    z, _, c = t.shape
    t = t.reshape(z, grid.h, grid.w, c)
    (top, bottom), (left, right) = _pads(grid.h, side, padding), _pads(grid.w, side, padding)
    if top or bottom or left or right:
        mode = "reflect" if padding == "reflect" else "constant"
        t = F.pad(t.permute(0, 3, 1, 2), (left, right, top, bottom), mode=mode)
        t = t.permute(0, 2, 3, 1)
    return t.reshape(z, t.shape[1] // side, side, t.shape[2] // side, side, c)


def _project(t: torch.Tensor, grid: TokenGrid, bases: torch.Tensor, padding: str) -> torch.Tensor:
    """Coefficients of the grid tokens on ``bases``: (Z, nH, nW, k, C)."""
    blocks = _to_blocks(t, grid, bases.shape[-1], padding)
    return torch.einsum("kuv,zhuwvc->zhwkc", bases, blocks).contiguous()


def _reconstruct(
    coef: torch.Tensor, grid: TokenGrid, bases: torch.Tensor, padding: str
) -> torch.Tensor:
    """Tokens (Z, h*w, C) from coefficients (Z, nH, nW, k, C); the padding is cropped."""
    blocks = torch.einsum("kuv,zhwkc->zhuwvc", bases, coef)
    z, nh, side, nw, _, c = blocks.shape
    top, left = _pads(grid.h, side, padding)[0], _pads(grid.w, side, padding)[0]
    t = blocks.reshape(z, nh * side, nw * side, c)[:, top : top + grid.h, left : left + grid.w]
    return t.reshape(z, grid.h * grid.w, c)


# ---------------------------------------------------------------- autograd


class LowRankLinear(torch.autograd.Function):
    """``F.linear`` whose backward runs in the span of the selected WHT bases.

    Saves the input's coefficients on the bases (grid tokens) and a copy of the
    extra tokens, never the input itself.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        grid: TokenGrid,
        bases: torch.Tensor,
        padding: str = "zero",
    ) -> torch.Tensor:
        y = F.linear(x, weight, bias)
        flat = x.reshape(-1, grid.tokens, x.shape[-1])
        coef = _project(flat[:, grid.prefix :], grid, bases, padding)
        # a clone, not a view: a view would keep the whole input alive
        extra = flat[:, : grid.prefix].clone() if grid.prefix else None
        ctx.save_for_backward(coef, extra, weight)
        ctx.grid, ctx.bases, ctx.padding, ctx.x_shape = grid, bases, padding, x.shape
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        coef, extra, weight = ctx.saved_tensors
        grid, bases, padding = ctx.grid, ctx.bases, ctx.padding
        g = grad_y.reshape(-1, grid.tokens, grad_y.shape[-1])
        g_extra = g[:, : grid.prefix]
        # orthogonal +-1 bases: projecting onto them and back divides by side**2
        g_coef = _project(g[:, grid.prefix :], grid, bases, padding) / bases.shape[-1] ** 2
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_grid = _reconstruct(g_coef @ weight, grid, bases, padding)
            grad_x = torch.cat([g_extra @ weight, grad_grid], dim=1).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            out, inp = weight.shape
            grad_w = g_coef.reshape(-1, out).T @ coef.reshape(-1, inp)
            if extra is not None:
                grad_w = grad_w + g_extra.reshape(-1, out).T @ extra.reshape(-1, inp)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(dim=(0, 1))
        return grad_x, grad_w, grad_b, None, None, None


# ---------------------------------------------------------------- token layouts


@dataclass
class _BlockInput:
    """The last channels-last (B, H, W, C) input of a block, read by its linears."""

    hw: tuple[int, int] | None = None

    def hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        self.hw = (
            (int(x.shape[1]), int(x.shape[2])) if torch.is_tensor(x) and x.dim() == 4 else None
        )


@dataclass
class _TokenLayout:
    """The token grids a linear layer may see; the first with a matching count wins."""

    window: tuple[int, int] | None  # the attention module's fixed window
    block: _BlockInput | None  # the enclosing block's input grid
    model_grid: TokenGrid | None  # a ViT's prefix tokens + patch grid

    def match(self, tokens: int) -> TokenGrid | None:
        candidates = []
        if self.window is not None:
            candidates.append(TokenGrid(0, *self.window))
        if self.block is not None and self.block.hw is not None:
            candidates.append(TokenGrid(0, *self.block.hw))
        if self.model_grid is not None:
            candidates.append(self.model_grid)
        return next((g for g in candidates if g.tokens == tokens), None)


def _model_grid(model: nn.Module) -> TokenGrid | None:
    grid_size = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid_size is None or len(grid_size) != 2:
        return None
    return TokenGrid(int(getattr(model, "num_prefix_tokens", 0)), *map(int, grid_size))


def _window(parent: nn.Module) -> tuple[int, int] | None:
    resolution = getattr(parent, "resolution", None)
    if isinstance(resolution, tuple) and len(resolution) == 2:
        return int(resolution[0]), int(resolution[1])
    return None


@functools.lru_cache(maxsize=64)
def _padding(grid: TokenGrid, side: int, padding: str) -> str:
    """``padding``, or "zero" for a grid too thin to reflect (logged once per grid)."""
    if padding == "reflect" and not can_reflect(grid, side):
        log.warning(
            "lbp_wht: a %dx%d grid cannot be reflected to %d; zero padding", grid.h, grid.w, side
        )
        return "zero"
    return padding


def _low_rank_forward(
    name: str, linear: nn.Linear, layout: _TokenLayout, config: LbpWhtArgs
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The replacement ``forward`` of one target linear layer."""
    warned = False

    def forward(x: torch.Tensor) -> torch.Tensor:
        nonlocal warned
        weight, bias = linear.weight, linear.bias
        needs_grad = x.requires_grad or any(
            p is not None and p.requires_grad for p in (weight, bias)
        )
        if not (linear.training and torch.is_grad_enabled() and needs_grad):
            return F.linear(x, weight, bias)
        grid = layout.match(int(x.shape[-2])) if x.dim() >= 3 else None
        if grid is None:
            if not warned:
                log.warning(
                    "lbp_wht: %s: input %s matches no token grid; exact backprop for this layer",
                    name,
                    tuple(x.shape),
                )
                warned = True
            return F.linear(x, weight, bias)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # cast as autocast would, outside the Function
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        side = min(config.block, _next_power_of_two(max(grid.h, grid.w)))
        bases = walsh_bases(side, config.order, config.selection).to(x.device, x.dtype)
        padding = _padding(grid, side, config.padding)
        return LowRankLinear.apply(x, weight, bias, grid, bases, padding)

    return forward


# ---------------------------------------------------------------- method


@METHODS.register(config_cls=LbpWhtArgs)
def lbp_wht(config: LbpWhtArgs, model: nn.Module, ctx: MethodContext) -> Adapted:
    """Low-rank WHT backprop through the blocks' linears; they, block norms and head train."""
    blocks = find_blocks(model)
    block_inputs: dict[str, _BlockInput] = {}
    model_grid = _model_grid(model)
    modules = dict(model.named_modules())
    pattern = re.compile(effective_target(model, config.target))
    trained: set[int] = set()
    for name, module in modules.items():
        if not (isinstance(module, nn.Linear) and pattern.fullmatch(name)):
            continue
        if is_classifier_param(f"{name}.weight", ctx.classifier):
            continue  # the head is trained exactly
        trained.update(id(p) for p in module.parameters(recurse=False))
        if getattr(module, "_vramsweep_lbp", False):
            continue
        owner = max((b for b, _ in blocks if name.startswith(b + ".")), key=len, default=None)
        if owner is not None and owner not in block_inputs:
            block_inputs[owner] = _BlockInput()
            modules[owner].register_forward_pre_hook(block_inputs[owner].hook)
        parent = modules[name.rpartition(".")[0]]
        layout = _TokenLayout(_window(parent), block_inputs.get(owner), model_grid)
        module.forward = _low_rank_forward(name, module, layout, config)
        module._vramsweep_lbp = True
    if not trained:
        raise RuntimeError(f"lbp_wht: target {config.target!r} matches no nn.Linear of the model")
    if config.train_norms:
        for _, block in blocks:
            for norm in block.modules():
                if isinstance(norm, nn.LayerNorm):
                    trained.update(id(p) for p in norm.parameters(recurse=False))
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in trained or is_classifier_param(name, ctx.classifier))
    log.info(
        "lbp_wht: %d linear layers, order %d (%s), block %d",
        sum(getattr(m, "_vramsweep_lbp", False) for m in model.modules()),
        config.order,
        config.selection,
        config.block,
    )
    return Adapted(model)
