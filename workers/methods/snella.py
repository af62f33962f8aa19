"""SNELLA: sparse tuning with kernelized LoRA and adaptive bi-level sparsity allocation.

Shen, Sun, Wang, Huang, "Kernelized Sparse Fine-Tuning with Bi-level Parameter
Competition for Vision Models", 2025. https://arxiv.org/abs/2510.24037
Reference code (with its predecessor SNELL, NeurIPS 2024): https://github.com/ssfgunner/SNELL
(``model/vision_transformer_timm.py`` ``SNELLA``, ``sparse_allocator.py`` ``Allocator``,
``scripts/vtab/snella32/``).

Each target linear layer gets two low-rank factors, A (in x r) and B (out x r). A
nonlinear kernel merges their rows into a full-size matrix K[i, j] = kappa(B_i, A_j)
whose rank is not bounded by r. Entries of K whose magnitude is at or below the layer's
quantile ``1 - keep`` are zeroed, and the sparse result is added to the frozen weight:

    update official: y = x (W + K * |K| * mask)^T + b    (|K| detached; the reference's)
    update scaled:   y = x (W + s * K * mask)^T + b      (s: a per-layer scale from 0)

Bi-level competition: layers compete for a global budget of surviving entries by
importance (an EMA of the sensitivity |p * grad| times an EMA of its uncertainty, over
each layer's factors, updated every optimizer step), the budget shrinking from an
initial to a final keep ratio on a cubic schedule; inside a layer, entries compete by
magnitude (the quantile threshold).

The defaults are the reference code's choices (equal to it to 1e-5 relative on a ViT
block's q, k, v, proj, fc1, fc2: tests/fixtures/official/snella.pt); each of ours is
an option:

- ``update``: ``official`` above (the adapted model differs from the base one at step
  0, as the kernel starts random); ``scaled``, a zero-initialised scale as LoRA's zero
  B: the two are equal until the first optimizer step.
- ``schedule``: the budget moves at each ``epoch`` start (the reference: no move at
  epoch 0, then epochs 1 .. E-1 on the cubic curve) or after every ``step``.
- ``qkv``: a fused qkv projection (timm's ViT, TinyViT, MambaVision) is ``split`` into
  q, k and v, each with its own factors, kernel, softmax and budget, as the reference's
  three separate layers; or ``fused``: one kernel and one budget for the whole matrix.
- ``zero_scores``: with every importance score zero the budget is shared ``equal``ly
  per layer (the reference's intent: as written its branch would raise on a float's
  ``.squeeze()``; it is unreachable there, as its kernel trains from step 1) or in
  proportion to layer ``size`` (one keep ratio for all).
- ``final_keep``: unset, it is the released script's for the trial's dataset
  (``FINAL_KEEP_BY_DATASET``: CIFAR-100 0.2, DTD 0.07; others CIFAR's).

Not reproduced: the reference's dropout (0.1) on the adapter's input and drop-path (0.1)
on its output (the update is merged into the weight here), and its AMP loss scale in
the sensitivities. These defaults changed the trial ids of snella grids written before
these options existed.

Memory: the optimizer holds only the factors, 3-4 scalars per kernel and the head. K
is built in forward and, like the reference code, rebuilt in backward (the layer is
checkpointed) instead of being kept: the layer saves only its input.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from workers.checkpointing import KeepForRecompute
from workers.methods.base import METHODS, Adapted, MethodContext, is_classifier_param
from workers.methods.lora import (
    BLOCK_LINEARS,
    check_target,
    effective_target,
    missing_targets,
)
from workers.quantile import quantile
from workers.structure import Structure

log = logging.getLogger(__name__)

# "mixed": the SNELLA kernel, distance + alpha * softmax(distance / gamma) + beta;
# "distance": SNELL's kernel alone; "linear": LoRA's inner product (rank <= r, ablation).
KERNELS = ("mixed", "distance", "linear")
UPDATES = ("official", "scaled")
SCHEDULES = ("epoch", "step")
QKV_MODES = ("split", "fused")
ZERO_SCORES = ("equal", "size")

DISTANCE_WEIGHT = 0.1  # weight of each of the two distance kernels (reference code)
# 1 - target_ratio of the released SNELLA-32 VTAB-1k scripts, by our dataset names
FINAL_KEEP_BY_DATASET = {"cifar100": 0.2, "dtd": 0.07}
DEFAULT_FINAL_KEEP = FINAL_KEEP_BY_DATASET["cifar100"]


@dataclass(frozen=True)
class SnellaArgs:
    """SNELLA's arguments.

    Defaults: rank 32, the mixed kernel, keep 0.99 at the start (init_thres 0.01), EMA
    betas 0.85 and no warm-up or final phase are those of the released SNELLA-32
    scripts; the final keep ratio is their per-dataset one (``FINAL_KEEP_BY_DATASET``).
    """

    r: int = 32  # columns of each factor; the distance kernels use two halves of r/2
    kernel: str = "mixed"  # how factor rows merge, one of KERNELS
    initial_keep: float = 0.99  # fraction of the merged entries kept at the start
    # global fraction kept once the cubic decrease ends; None: the trial dataset's
    final_keep: float | None = None
    warmup_fraction: float = 0.0  # leading fraction of the schedule at initial_keep
    final_fraction: float = 0.0  # trailing fraction of the schedule at final_keep
    beta1: float = 0.85  # EMA factor of the sensitivity |p * grad|
    beta2: float = 0.85  # EMA factor of the uncertainty |sensitivity - its EMA|
    target: str = BLOCK_LINEARS  # regular expression over linear layers' names (full match)
    update: str = "official"  # "official": K * |K| * mask; "scaled": s * K * mask, s from 0
    schedule: str = "epoch"  # the budget moves at each "epoch" start or after each "step"
    qkv: str = "split"  # a fused qkv as q, k, v kernels ("split") or one kernel ("fused")
    zero_scores: str = "equal"  # all scores zero: budget shared "equal"ly or by "size"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        for name, valid in (
            ("kernel", KERNELS),
            ("update", UPDATES),
            ("schedule", SCHEDULES),
            ("qkv", QKV_MODES),
            ("zero_scores", ZERO_SCORES),
        ):
            if getattr(self, name) not in valid:
                got = getattr(self, name)
                raise ValueError(f"{name} must be one of {', '.join(valid)}, got {got!r}")
        if self.kernel != "linear" and self.r % 2:
            raise ValueError(
                f"r must be even for the {self.kernel!r} kernel (two halves), got {self.r}"
            )
        for name in ("initial_keep", "final_keep"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.final_keep is not None and self.final_keep > self.initial_keep:
            raise ValueError(
                f"final_keep ({self.final_keep}) must not exceed initial_keep ({self.initial_keep})"
            )
        for name in ("warmup_fraction", "final_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.warmup_fraction + self.final_fraction >= 1.0:
            raise ValueError(
                "warmup_fraction + final_fraction must be < 1, got "
                f"{self.warmup_fraction} + {self.final_fraction}"
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        check_target(self.target)

    def missing(self, structure: Structure) -> str | None:
        return missing_targets(structure, self.target)


def final_keep_for(config: SnellaArgs, dataset: str) -> float:
    """The grid's ``final_keep``, else the dataset's (never above ``initial_keep``)."""
    if config.final_keep is not None:
        return config.final_keep
    return min(FINAL_KEEP_BY_DATASET.get(dataset, DEFAULT_FINAL_KEEP), config.initial_keep)


# ---------------------------------------------------------------- the kernelized layer


def distance_kernel(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """SNELL's kernel: 0.1 * (|b' - a'| - |b'' - a''|) over the two column halves.

    ``b``: (out, r), ``a``: (in, r); returns (out, in). The Euclidean distance is not
    an inner product of the rows, so the result is generically of full rank.
    """
    half = b.shape[1] // 2
    near = torch.cdist(b[:, :half], a[:, :half])  # through a matmul: ~7x faster on CPU
    far = torch.cdist(b[:, half:], a[:, half:])
    return DISTANCE_WEIGHT * (near - far)


class SnellaKernel(nn.Module):
    """One merged matrix K (rows x in) from factors A (in x r) and B (rows x r).

    ``keep_ratio`` is the fraction of its entries that survive, set by the allocator.
    """

    def __init__(self, in_features: int, rows: int, r: int, kernel: str, keep: float, like: dict):
        super().__init__()
        self.kernel = kernel
        self.keep_ratio = keep
        # the reference's kaiming-uniform bound on (2, rows, r/2): 1 / sqrt(rows * r / 2)
        self.A = nn.Parameter(_uniform((in_features, r), like))
        self.B = nn.Parameter(_uniform((rows, r), like))
        if kernel == "mixed":
            self.alpha = nn.Parameter(torch.ones((), **like))
            self.gamma = nn.Parameter(torch.ones((), **like))
            self.beta = nn.Parameter(torch.zeros((), **like))

    @property
    def size(self) -> int:
        return self.A.shape[0] * self.B.shape[0]

    def matrix(self) -> torch.Tensor:
        """The dense merged matrix K (rows x in)."""
        a, b = self.A, self.B
        if self.kernel == "linear":
            return b @ a.T
        dist = distance_kernel(b, a)
        if self.kernel == "distance":
            return dist
        # softmax over the outputs of each input, as the reference's softmax(dim=-1) of K^T
        soft = torch.softmax(dist / self.gamma, dim=0)
        return dist + self.alpha * soft + self.beta

    def sparse(self, update: str) -> torch.Tensor:
        """K with entries at or below the (1 - keep_ratio) quantile of |K| zeroed;
        ``official``: also times |K| (detached), as the reference's ``sparsify``."""
        merged = self.matrix()
        with torch.no_grad():
            magnitude = merged.abs()
            mask = magnitude > quantile(magnitude, max(0.0, 1.0 - self.keep_ratio))
        if update == "official":
            return merged * (magnitude * mask)
        return merged * mask


class SnellaLinear(nn.Module):
    """A frozen linear layer plus a sparse kernelized update of one or more row groups.

    ``weight`` and ``bias`` are the base layer's own parameters under their own names,
    so state dicts of the base model still load. ``rows`` (one list of weight rows per
    kernel, e.g. q, k, v) splits the update; None: one kernel for the whole matrix.
    """

    def __init__(
        self,
        base: nn.Linear,
        config: SnellaArgs,
        rows: list[list[int]] | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.update = config.update
        self.weight = base.weight
        self.bias = base.bias
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        groups = rows or [list(range(self.out_features))]
        self.snella_parts = nn.ModuleList(
            SnellaKernel(
                self.in_features, len(g), config.r, config.kernel, config.initial_keep, like
            )
            for g in groups
        )
        order = [i for g in groups for i in g]
        inverse = None if order == sorted(order) else torch.argsort(torch.tensor(order))
        self.register_buffer("snella_rows", inverse, persistent=False)
        if config.update == "scaled":
            self.snella_scale = nn.Parameter(torch.zeros((), **like))

    def extra_repr(self) -> str:
        r = self.snella_parts[0].A.shape[1]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={r}, "
            f"kernels={len(self.snella_parts)}, update={self.update}"
        )

    def _rows(self, parts: list[torch.Tensor]) -> torch.Tensor:
        merged = torch.cat(parts, dim=0)
        return merged if self.snella_rows is None else merged[self.snella_rows]

    def kernel_matrix(self) -> torch.Tensor:
        """The dense merged matrix K (out x in), before sparsification."""
        return self._rows([part.matrix() for part in self.snella_parts])

    def delta_weight(self) -> torch.Tensor:
        """The sparse update (out x in) that forward adds to the weight."""
        delta = self._rows([part.sparse(self.update) for part in self.snella_parts])
        return self.snella_scale * delta if self.update == "scaled" else delta

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight + self.delta_weight(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self._forward(x)
        # Recompute K in backward rather than keep its weight-sized intermediates; the
        # input, kept for the recompute, is made visible to saved-tensor memory meters.
        if x.requires_grad:
            x = KeepForRecompute.apply(x)
        return checkpoint(self._forward, x, use_reentrant=False)


def _uniform(shape: tuple[int, int], like: dict) -> torch.Tensor:
    rows, r = shape
    bound = math.sqrt(2.0 / (rows * r))
    return torch.empty(shape, **like).uniform_(-bound, bound)


def qkv_rows(name: str, linear: nn.Linear, attention: nn.Module) -> list[list[int]] | None:
    """The q, k and v rows of a fused ``qkv`` projection; None for any other layer.

    TinyViT lays rows out per head ([q | k | v] of each head, ``key_dim`` / ``val_dim``);
    timm's ViT and MambaVision as three blocks of ``out / 3`` rows (q, then k, then v).
    """
    if name.rpartition(".")[2] != "qkv":
        return None
    out = linear.out_features
    heads, key, val = (getattr(attention, a, None) for a in ("num_heads", "key_dim", "val_dim"))
    if all(isinstance(v, int) for v in (heads, key, val)) and heads * (2 * key + val) == out:
        per = 2 * key + val
        bounds = ((0, key), (key, 2 * key), (2 * key, per))
        return [[h * per + i for h in range(heads) for i in range(lo, hi)] for lo, hi in bounds]
    if out % 3 == 0:
        third = out // 3
        return [list(range(i * third, (i + 1) * third)) for i in range(3)]
    return None


# ---------------------------------------------------------------- the allocation


def phase_units(total: int, config: SnellaArgs) -> tuple[int, int]:
    """(warm-up units, final-phase units) of a ``total``-unit schedule (steps or epochs)."""
    return round(config.warmup_fraction * total), round(config.final_fraction * total)


def keep_schedule(t: int, total: int, config: SnellaArgs) -> float:
    """Global keep ratio at unit ``t`` (step or epoch) of a ``total``-unit schedule.

    ``initial_keep`` through the warm-up, a cubic decrease to ``final_keep`` at
    ``total - final units``, then ``final_keep`` (the reference's
    ``schedule_threshold``; AdaLoRA's budget schedule).

    Example:
        >>> keep_schedule(5, 10, SnellaArgs(initial_keep=0.9, final_keep=0.1))
        0.2
    """
    final_keep = DEFAULT_FINAL_KEEP if config.final_keep is None else config.final_keep
    warmup, final = phase_units(total, config)
    if t <= warmup:
        return config.initial_keep
    progress = min(1.0, (t - warmup) / max(1, total - final - warmup))
    return final_keep + (config.initial_keep - final_keep) * (1.0 - progress) ** 3


def allocate(
    scores: Sequence[float], sizes: Sequence[int], volume: int, zero_scores: str = "equal"
) -> list[int]:
    """Split ``volume`` entries among layers in proportion to ``scores``, none above its size.

    The reference's ``param_alloc``: each layer first gets the whole part of its share
    (capped at its size), then what is left is shared again among the layers not full,
    by score, until the volume is met; the counts are then truncated (their sum may
    fall short of the volume by less than the number of layers). All scores zero: equal
    shares (``zero_scores="equal"``) or shares by size (``"size"``).

    Example:
        >>> allocate([3.0, 1.0], [10, 100], 40)
        [10, 30]
    """
    size = torch.tensor(sizes, dtype=torch.float64)
    score = torch.nan_to_num(torch.tensor(scores, dtype=torch.float64)).clamp_min(0.0)
    volume = min(volume, int(size.sum()))
    if score.sum() <= 0:
        score = torch.ones_like(size) if zero_scores == "equal" else size.clone()
    score = score / score.sum()
    share = torch.minimum((volume * score).floor(), size)
    for _ in range(len(sizes) + 1):  # a round fills a layer or meets the volume
        rest = volume - float(share.sum())
        open_ = share < size
        if rest <= 1e-6 or not open_.any():
            break
        weight = torch.where(open_, score, 0.0)
        if weight.sum() <= 0:  # only unscored layers have room: by their room
            weight = torch.where(open_, size - share, 0.0)
        share = torch.minimum(share + rest * weight / weight.sum(), size)
    return [int(c) for c in share.floor()]


class SnellaAllocator:
    """Layer-level competition: importance EMAs and each kernel's ``keep_ratio``.

    ``step(step)`` is the trainer's ``on_optimizer_step``: it reads the factors'
    gradients of the step just taken and updates the EMAs; at each allocation point
    (every step, or every epoch start) it sets every kernel's ``keep_ratio``, the total
    following ``keep_schedule``.
    """

    def __init__(
        self,
        parts: dict[str, SnellaKernel],
        config: SnellaArgs,
        total_steps: int,
        steps_per_epoch: int = 0,
    ):
        self.parts = parts
        self.config = config
        self.total_steps = max(1, total_steps)
        self.steps_per_epoch = steps_per_epoch if config.schedule == "epoch" else 0
        if config.schedule == "epoch" and steps_per_epoch <= 0:
            log.warning("snella: steps per epoch unknown; the budget moves every step")
        self.sizes = [part.size for part in parts.values()]
        self._sensitivity: dict[str, torch.Tensor] = {}  # EMA of |p * grad|, per factor entry
        self._uncertainty: dict[str, torch.Tensor] = {}  # EMA of |sensitivity - its EMA|

    def allocation(self) -> dict[str, float]:
        """Each kernel's keep ratio."""
        return {name: part.keep_ratio for name, part in self.parts.items()}

    def scores(self) -> list[float]:
        """Each kernel's importance: mean sensitivity x uncertainty over A plus over B."""
        out = []
        for name in self.parts:
            total = 0.0
            for factor in ("A", "B"):
                key = f"{name}.{factor}"
                if key in self._sensitivity:
                    total += float((self._sensitivity[key] * self._uncertainty[key]).mean())
            out.append(total)
        return out

    @torch.no_grad()
    def update_importance(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        for name, part in self.parts.items():
            for factor, param in (("A", part.A), ("B", part.B)):
                key = f"{name}.{factor}"
                if param.grad is None:
                    sensitivity = torch.zeros_like(param)
                else:
                    sensitivity = (param * param.grad).abs()
                    sensitivity = torch.nan_to_num(sensitivity, nan=0.0, posinf=0.0)
                if key not in self._sensitivity:
                    self._sensitivity[key] = torch.zeros_like(param)
                    self._uncertainty[key] = torch.zeros_like(param)
                ema = self._sensitivity[key].mul_(beta1).add_(sensitivity, alpha=1 - beta1)
                self._uncertainty[key].mul_(beta2).add_((sensitivity - ema).abs(), alpha=1 - beta2)

    def point(self, step: int) -> tuple[int, int] | None:
        """(unit, total units) of the schedule if the budget moves after ``step``."""
        per_epoch = self.steps_per_epoch
        if per_epoch <= 0:
            return step, self.total_steps
        epochs = math.ceil(self.total_steps / per_epoch)
        epoch, within = divmod(step, per_epoch)
        return (epoch, epochs) if within == 0 and epoch < epochs else None

    def reallocate(self, t: int, total: int) -> None:
        """Share the budget of unit ``t`` among the kernels by their scores."""
        volume = int(keep_schedule(t, total, self.config) * sum(self.sizes))
        counts = allocate(self.scores(), self.sizes, volume, self.config.zero_scores)
        for part, count, size in zip(self.parts.values(), counts, self.sizes, strict=True):
            part.keep_ratio = count / size

    def step(self, step: int) -> None:
        self.update_importance()
        point = self.point(step)
        if point is not None and point[0] > phase_units(point[1], self.config)[0]:
            self.reallocate(*point)  # through the warm-up the budget holds


# ---------------------------------------------------------------- the method


@METHODS.register(config_cls=SnellaArgs)
def snella(config: SnellaArgs, model: nn.Module, ctx: MethodContext) -> Adapted:
    """Sparse kernelized updates of the blocks' linear layers, budget allocated by importance."""
    config = replace(config, final_keep=final_keep_for(config, ctx.dataset))
    pattern = re.compile(effective_target(model, config.target))
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and pattern.fullmatch(name)
    ]
    if not targets:
        raise ValueError(f"snella: no linear layer's name matches target {config.target!r}")
    for param in model.parameters():
        param.requires_grad_(False)
    parts: dict[str, SnellaKernel] = {}
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        rows = qkv_rows(name, linear, parent) if config.qkv == "split" else None
        layer = SnellaLinear(linear, config, rows)
        setattr(parent, child, layer)
        suffixes = ("q", "k", "v") if rows else ("",)
        for suffix, part in zip(suffixes, layer.snella_parts, strict=True):
            parts[f"{name}.{suffix}" if suffix else name] = part
    for name, param in model.named_parameters():
        if is_classifier_param(name, ctx.classifier):
            param.requires_grad_(True)
    allocator = SnellaAllocator(parts, config, ctx.total_steps, ctx.steps_per_epoch)
    log.info(
        "snella: %d kernels in %d layers, rank %d, %s kernel, %s update, keep %.3g -> %.3g "
        "by %s (%s)",
        len(parts),
        len(targets),
        config.r,
        config.kernel,
        config.update,
        config.initial_keep,
        config.final_keep,
        config.schedule,
        ctx.dataset or "dataset unknown",
    )
    return Adapted(model, on_optimizer_step=allocator.step)
