"""MambaVision: a hierarchical hybrid of convolution, Mamba-mixer and self-attention stages.

Hatamizadeh, Kautz, "MambaVision: A Hybrid Mamba-Transformer Vision Backbone", CVPR 2025.
https://arxiv.org/abs/2407.08083
Official code: https://github.com/NVlabs/MambaVision (``mambavision/models/mamba_vision.py``).
This is our own code, for the ``mamba_vision_T``-style configurations (no layer scale).

Architecture, as the official code builds it:

- a stem of two stride-2 3x3 convolutions (BatchNorm, ReLU): H/4;
- four levels, a stride-2 3x3 convolution between consecutive ones. Levels 1-2:
  residual blocks of two 3x3 convolutions with BatchNorm (GELU between). Levels 3-4:
  the feature map is cut into windows of ``window_size`` x ``window_size`` tokens (padded
  to a multiple), and each window runs through pre-norm blocks ``x + mixer(LN(x))``,
  ``x + MLP(LN(x))``: the first half of the blocks mix with the MambaVision mixer, the
  second half with multi-head self-attention;
- BatchNorm, global average pooling, linear head.

The MambaVision mixer splits its input projection into x and z; x goes through a
depthwise convolution (non-causal, "same" padding), SiLU and the selective scan (no
gating); z through its own convolution and SiLU; the two halves are concatenated and
projected back. As in the official code, the step-size projection's bias is applied
twice: by the ``dt_proj`` layer and again as the scan's ``delta_bias``; and the model's
initialisation (truncated normal linears, zero biases) overrides Mamba's special
initialisation of ``dt_proj``.

Parameter and buffer names and shapes are the official ones (``levels.2.blocks.5.mixer.
qkv.weight``, ``patch_embed.conv_down.0.weight``, ...): the released checkpoints load
with strict key matching.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models.vision_transformer import Attention
from torch import nn
from torch.utils.checkpoint import checkpoint

from workers.mamba.kernels import ScanInputs, selective_scan
from workers.mamba.vim import IMAGENET_MEAN, IMAGENET_STD, s4d_real_log

log = logging.getLogger(__name__)


class MambaVisionMixer(nn.Module):
    """(B, L, C) -> (B, L, C): an SSM half (conv, SiLU, selective scan) beside a gate-free
    conv half, concatenated and projected back."""

    def __init__(self, d_model: int, d_state: int = 8, d_conv: int = 3, expand: int = 1) -> None:
        super().__init__()
        d_inner = expand * d_model
        half = d_inner // 2
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, d_inner, bias=False)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, half)
        self.A_log = nn.Parameter(s4d_real_log(half, d_state))
        self.D = nn.Parameter(torch.ones(half))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        # official: F.conv1d(..., padding="same") with these modules' weights (no bias)
        self.conv1d_x = nn.Conv1d(half, half, d_conv, groups=half, bias=False, padding="same")
        self.conv1d_z = nn.Conv1d(half, half, d_conv, groups=half, bias=False, padding="same")
        self.scan_inputs = ScanInputs()  # the scan operands' call site (a quantization hook)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d_x(x))
        z = F.silu(self.conv1d_z(z))
        dt, B, C = self.x_proj(x.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        delta = self.dt_proj(dt).transpose(1, 2)
        x, delta, B, C = self.scan_inputs(x, delta, B.transpose(1, 2), C.transpose(1, 2))
        y = selective_scan(
            x,
            delta,
            -torch.exp(self.A_log.float()),
            B,
            C,
            self.D.float(),
            delta_bias=self.dt_proj.bias.float(),  # a second time, as the official code
            delta_softplus=True,
        )
        return self.out_proj(torch.cat([y, z], dim=1).transpose(1, 2))


class MambaVisionBlock(nn.Module):
    """Pre-norm token block: ``x + mixer(LN(x))``, ``x + MLP(LN(x))`` on (B, L, C) windows."""

    def __init__(
        self, dim: int, num_heads: int, attention: bool, mlp_ratio: float, drop_path: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = (
            Attention(dim, num_heads=num_heads, qkv_bias=True)
            if attention
            else MambaVisionMixer(dim)
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvBlock(nn.Module):
    """Residual block of two 3x3 convolutions with BatchNorm, GELU (tanh) between."""

    def __init__(self, dim: int, drop_path: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(dim)
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return x + self.drop_path(y)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution doubling the channels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(x)


class Stem(nn.Module):
    """Two stride-2 3x3 convolutions with BatchNorm and ReLU: (B, 3, H, W) -> (B, C, H/4, W/4)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.conv_down = nn.Sequential(
            nn.Conv2d(3, in_dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(in_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(dim, eps=1e-4),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_down(x)


def attention_blocks(depth: int) -> range:
    """Indices of a token level's self-attention blocks: its second half (official rule)."""
    return range(depth // 2 + 1, depth) if depth % 2 else range(depth // 2, depth)


def window_partition(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * windows, size * size, C), windows in row-major order."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // size, size, w // size, size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, size * size, c)


def window_reverse(windows: torch.Tensor, size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``window_partition``: (B * windows, size * size, C) -> (B, C, h, w)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // size, w // size, size, size, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, c, h, w)


class MambaVisionLevel(nn.Module):
    """One level: convolution blocks, or windowed token blocks; then the downsampling."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        conv: bool,
        downsample: bool,
        mlp_ratio: float,
        drop_path: Sequence[float],
    ) -> None:
        super().__init__()
        self.conv = conv
        self.window_size = window_size
        mixers = attention_blocks(depth)
        self.blocks = nn.ModuleList(
            ConvBlock(dim, drop_path[i])
            if conv
            else MambaVisionBlock(dim, num_heads, i in mixers, mlp_ratio, drop_path[i])
            for i in range(depth)
        )
        self.downsample = Downsample(dim) if downsample else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        if not self.conv:
            size = self.window_size
            x = F.pad(x, (0, -w % size, 0, -h % size))
            padded_h, padded_w = x.shape[-2:]
            x = window_partition(x, size)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if not self.conv:
            x = window_reverse(x, size, padded_h, padded_w)[:, :, :h, :w].contiguous()
        return x if self.downsample is None else self.downsample(x)


class MambaVision(nn.Module):
    """MambaVision (see the module doc). Any input resolution: windows are padded.

    timm's vocabulary: ``forward_features`` (pooled features), ``forward_head``,
    ``set_grad_checkpointing``; ``pretrained_cfg`` with ``input_size`` and ``classifier``.
    """

    def __init__(
        self,
        dim: int = 80,
        in_dim: int = 32,
        depths: Sequence[int] = (1, 3, 8, 4),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        window_size: Sequence[int] = (8, 8, 14, 7),
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        drop_path_rate: float = 0.2,
        img_size: int = 224,
    ) -> None:
        super().__init__()
        num_features = dim * 2 ** (len(depths) - 1)
        self.patch_embed = Stem(in_dim, dim)
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear decay
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.levels = nn.ModuleList(
            MambaVisionLevel(
                dim * 2**i,
                depth,
                num_heads[i],
                window_size[i],
                conv=i < 2,
                downsample=i < len(depths) - 1,
                mlp_ratio=mlp_ratio,
                drop_path=rates[starts[i] : starts[i] + depth],
            )
            for i, depth in enumerate(depths)
        )
        self.norm = nn.BatchNorm2d(num_features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(num_features, num_classes)
        self.pretrained_cfg = {
            "input_size": (3, img_size, img_size),
            "num_classes": num_classes,
            "classifier": "head",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        }
        for module in self.modules():  # the official initialisation
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm | nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in backward (timm's switch)."""
        for level in self.levels:
            level.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> pooled features (B, C)."""
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
        return torch.flatten(self.avgpool(self.norm(x)), 1)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
