"""Vision Mamba (Vim): bidirectional Mamba blocks over patch tokens with a middle class token.

Zhu, Liao, Zhang, Wang, Liu, Wang, "Vision Mamba: Efficient Visual Representation
Learning with Bidirectional State Space Model", ICML 2024. https://arxiv.org/abs/2401.09417
Official code: https://github.com/hustvl/Vim (``vim/models_mamba.py``, and the ``Mamba``
mixer of its ``mamba-1p1p1/mamba_ssm/modules/mamba_simple.py``). This is our own code,
for the ``*_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2`` variants.

Architecture, as the official code builds it:

- 16 x 16 patches (a strided convolution), a class token inserted in the middle of the
  patch sequence (position N // 2), an absolute position embedding;
- ``depth`` blocks ``x + mixer(RMSNorm(x))``, the residual stream kept in fp32;
- the mixer ("bimamba v2"): one input projection to (x, z); a forward and a backward
  branch (the backward one runs on the reversed sequence), each with its own depthwise
  causal convolution, x/dt projections, A, D; the two gated outputs averaged ("div2")
  and projected back;
- a final RMSNorm; the head classifies the middle class token. (The variant's name says
  mean pooling, but with a class token the official forward returns that token: the
  released weights were trained that way.)

Parameter names and shapes are the official ones (``layers.<i>.mixer.in_proj.weight``,
``norm_f.weight``, ...), so the released checkpoints load with strict key matching.
The official block returns (mixer output, residual) and adds them in the next block (a
fused add + norm kernel); ``x + mixer(norm(x))`` is the same function with one tensor
in and out, which the block-wise checkpointing needs. Each block's drop path drops its
own mixer output at the rate the official code uses for it.
"""

from __future__ import annotations

import logging
import math

import torch
from timm.layers import DropPath, PatchEmbed, lecun_normal_, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from workers.mamba.kernels import ScanInputs, causal_conv1d_silu, selective_scan

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the DeiT recipe that Vim trains with
IMAGENET_STD = (0.229, 0.224, 0.225)


def s4d_real_log(channels: int, state: int) -> torch.Tensor:
    """log of -A at the S4D-real initialisation: A[d, n] = -(n + 1) for every channel."""
    return torch.log(torch.arange(1, state + 1, dtype=torch.float32).repeat(channels, 1))


def init_dt_projection(
    dt_proj: nn.Linear, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4
) -> None:
    """Mamba's initialisation of the step-size projection: weights uniform in
    +-rank^-1/2, and a bias whose softplus is log-uniform in [dt_min, dt_max]."""
    bound = dt_proj.in_features**-0.5
    with torch.no_grad():
        dt_proj.weight.uniform_(-bound, bound)
        dt = torch.exp(
            torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=floor)
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus


class BiMambaMixer(nn.Module):
    """Vim's bidirectional Mamba mixer (bimamba v2, outputs averaged): (B, L, C) -> (B, L, C)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> None:
        super().__init__()
        d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        # registration order as in the official module (state-dict order)
        self.conv1d, self.x_proj, self.dt_proj = self._branch(d_inner, d_conv)
        self.A_log = nn.Parameter(s4d_real_log(d_inner, d_state))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.A_b_log = nn.Parameter(s4d_real_log(d_inner, d_state))
        self.conv1d_b, self.x_proj_b, self.dt_proj_b = self._branch(d_inner, d_conv)
        self.D_b = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        # the scan operands' call sites (identities without parameters: quantization hooks)
        self.scan_inputs, self.scan_inputs_b = ScanInputs(), ScanInputs()

    def _branch(self, d_inner: int, d_conv: int) -> tuple[nn.Conv1d, nn.Linear, nn.Linear]:
        conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        x_proj = nn.Linear(d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        dt_proj = nn.Linear(self.dt_rank, d_inner)
        init_dt_projection(dt_proj)
        return conv, x_proj, dt_proj

    def _ssm(
        self,
        xz: torch.Tensor,
        conv: nn.Conv1d,
        x_proj: nn.Module,
        dt_proj: nn.Module,
        A_log: torch.Tensor,
        D: torch.Tensor,
        scan_inputs: nn.Module,
    ) -> torch.Tensor:
        """One direction: conv, selective scan gated by z; (B, 2 d_inner, L) -> (B, d_inner, L)."""
        x, z = xz.chunk(2, dim=1)
        x = causal_conv1d_silu(conv, x)
        dt, B, C = x_proj(x.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        delta = dt_proj(dt).transpose(1, 2)  # the bias is added here, before the softplus
        x, delta, B, C = scan_inputs(x, delta, B.transpose(1, 2), C.transpose(1, 2))
        A = -torch.exp(A_log.float())
        return selective_scan(x, delta, A, B, C, D.float(), z=z, delta_softplus=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2 d_inner, L)
        forward = self._ssm(
            xz, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, self.scan_inputs
        )
        backward = self._ssm(
            xz.flip(-1),
            self.conv1d_b,
            self.x_proj_b,
            self.dt_proj_b,
            self.A_b_log,
            self.D_b,
            self.scan_inputs_b,
        )
        return self.out_proj(((forward + backward.flip(-1)) / 2).transpose(1, 2))


class VimBlock(nn.Module):
    """``x + drop_path(mixer(RMSNorm(x)))`` with the residual stream in fp32."""

    def __init__(self, dim: int, d_state: int, eps: float, drop_path: float) -> None:
        super().__init__()
        self.mixer = BiMambaMixer(dim, d_state)
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x + self.drop_path(self.mixer(self.norm(x))).float()


class VisionMamba(nn.Module):
    """Vim with a middle class token and absolute position embedding (see the module doc).

    timm's vocabulary: ``forward_features`` (normalised tokens), ``forward_head``,
    ``set_grad_checkpointing``; ``pretrained_cfg`` with ``input_size`` and ``classifier``.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 24,
        d_state: int = 16,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        patches = self.patch_embed.num_patches
        self.cls_position = patches // 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, embed_dim))
        self.head = nn.Linear(embed_dim, num_classes)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear decay
        self.layers = nn.ModuleList(VimBlock(embed_dim, d_state, eps, r) for r in rates)
        self.norm_f = nn.RMSNorm(embed_dim, eps=eps)
        self.grad_checkpointing = False
        self.pretrained_cfg = {
            "input_size": (3, img_size, img_size),
            "num_classes": num_classes,
            "classifier": "head",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        }

        # the official initialisation
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for param in (self.pos_embed, self.cls_token, self.head.weight):
            trunc_normal_(param, std=0.02)
        nn.init.zeros_(self.head.bias)
        for layer in self.layers:  # GPT-2's 1/sqrt(depth) on the residual branch's output
            out_proj = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(out_proj, a=math.sqrt(5))
            with torch.no_grad():
                out_proj /= math.sqrt(depth)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in backward (timm's switch)."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> normalised tokens (B, N + 1, C), class token in the middle."""
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        mid = self.cls_position
        x = torch.cat([x[:, :mid], cls, x[:, mid:]], dim=1) + self.pos_embed
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.norm_f(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, self.cls_position])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
