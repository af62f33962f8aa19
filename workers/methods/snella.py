"""SNELLA: sparse tuning with kernelized LoRA and adaptive bi-level sparsity allocation.

Shen, Sun, Wang, Huang, "Kernelized Sparse Fine-Tuning with Bi-level Parameter
Competition for Vision Models", 2025. https://arxiv.org/abs/2510.24037
Reference code (with its predecessor SNELL, NeurIPS 2024): https://github.com/ssfgunner/SNELL

Each target linear layer gets two low-rank factors, A (in x r) and B (out x r). A
nonlinear kernel merges their rows into a full-size matrix K[i, j] = kappa(B_i, A_j)
whose rank is not bounded by r. Only the largest-magnitude entries of K survive, the
rest are zero, and the sparse result is added to the frozen weight:

    y = x (W + s * sparse_k(K))^T + b      (s: a per-layer scale, zero at the start)

Bi-level competition: layers compete for a global budget of surviving entries by
importance (an EMA of the sensitivity |p * grad| times an EMA of its uncertainty, over
each layer's factors, as AdaLoRA scores singular values), the budget shrinking from an
initial to a final keep ratio on a cubic schedule; inside a layer, entries compete by
magnitude (the top-k threshold).

Memory: the optimizer holds only the factors, 1-4 scalars per layer and the head. K
is built in forward and, like the reference code, rebuilt in backward (the layer is
checkpointed) instead of being kept: the layer saves only its input.

Where this differs from the reference code, and why:
- The reference starts from the random kernel value, so its adapted model differs
  from the base model at step 0; a zero-initialised scale ``s`` (as LoRA's zero B)
  makes the two equal until the first optimizer step.
- The reference multiplies surviving entries by their detached magnitude; here they
  are kept as they are (a plain top-k mask), as the method is described.
- With all importance scores zero (the first step: the factors get no gradient while
  ``s`` is zero) the budget is shared in proportion to layer size (one keep ratio for
  all); the reference shares it equally per layer whatever the size.
- The budget schedule advances per optimizer step (the reference's per epoch; its
  importance EMAs per step, as here).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

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
from workers.structure import Structure

log = logging.getLogger(__name__)

# "mixed": the SNELLA kernel, distance + alpha * softmax(distance / gamma) + beta;
# "distance": SNELL's kernel alone; "linear": LoRA's inner product (rank <= r, ablation).
KERNELS = ("mixed", "distance", "linear")

DISTANCE_WEIGHT = 0.1  # weight of each of the two distance kernels (reference code)


@dataclass(frozen=True)
class SnellaArgs:
    """SNELLA's arguments.

    Defaults: rank 32, the mixed kernel, EMA betas 0.85 and no warm-up or final phase
    are those of the released SNELLA-32 scripts; keep ratios 0.99 -> 0.2 are those of
    its VTAB-1k CIFAR-100 script (init_thres 0.01, target_ratio 0.8). The paper tunes
    the final ratio per dataset (0.07 to 1.0).
    """

    r: int = 32  # columns of each factor; the distance kernels use two halves of r/2
    kernel: str = "mixed"  # how factor rows merge, one of KERNELS
    initial_keep: float = 0.99  # fraction of the merged entries kept at the start
    final_keep: float = 0.2  # global fraction kept once the cubic decrease ends
    warmup_fraction: float = 0.0  # leading fraction of the steps at initial_keep, no competition
    final_fraction: float = 0.0  # trailing fraction of the steps at final_keep
    beta1: float = 0.85  # EMA factor of the sensitivity |p * grad|
    beta2: float = 0.85  # EMA factor of the uncertainty |sensitivity - its EMA|
    target: str = BLOCK_LINEARS  # regular expression over linear layers' names (full match)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.kernel != "linear" and self.r % 2:
            raise ValueError(
                f"r must be even for the {self.kernel!r} kernel (two halves), got {self.r}"
            )
        for name in ("initial_keep", "final_keep"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.final_keep > self.initial_keep:
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


class SnellaLinear(nn.Module):
    """A frozen linear layer plus a sparse kernelized update.

    ``weight`` and ``bias`` are the base layer's own parameters under their own names,
    so state dicts of the base model still load. ``keep`` is the number of merged
    entries that survive, set by the allocator.
    """

    def __init__(self, base: nn.Linear, r: int, kernel: str, keep: int) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.kernel = kernel
        self.keep = keep
        self.weight = base.weight
        self.bias = base.bias
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        # the reference's kaiming-uniform bound on (2, rows, r/2): 1 / sqrt(rows * r / 2)
        self.snella_A = nn.Parameter(_uniform((self.in_features, r), like))
        self.snella_B = nn.Parameter(_uniform((self.out_features, r), like))
        self.snella_scale = nn.Parameter(torch.zeros((), **like))
        if kernel == "mixed":
            self.snella_alpha = nn.Parameter(torch.ones((), **like))
            self.snella_gamma = nn.Parameter(torch.ones((), **like))
            self.snella_beta = nn.Parameter(torch.zeros((), **like))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"r={self.snella_A.shape[1]}, kernel={self.kernel}, keep={self.keep}"
        )

    @property
    def keep_ratio(self) -> float:
        return self.keep / self.weight.numel()

    def kernel_matrix(self) -> torch.Tensor:
        """The dense merged matrix K (out x in), before sparsification and scale."""
        a, b = self.snella_A, self.snella_B
        if self.kernel == "linear":
            return b @ a.T
        dist = distance_kernel(b, a)
        if self.kernel == "distance":
            return dist
        # softmax over the outputs of each input, as the reference's softmax(dim=-1) of K^T
        soft = torch.softmax(dist / self.snella_gamma, dim=0)
        return dist + self.snella_alpha * soft + self.snella_beta

    def delta_weight(self) -> torch.Tensor:
        """The update s * sparse_k(K) (out x in) that forward adds to the weight."""
        merged = self.kernel_matrix()
        if self.keep >= merged.numel():
            return self.snella_scale * merged
        with torch.no_grad():
            magnitude = merged.abs()
            # the (n - keep)-th smallest magnitude: exactly `keep` entries lie above it
            threshold = magnitude.flatten().kthvalue(merged.numel() - self.keep).values
            mask = magnitude > threshold
        return self.snella_scale * (merged * mask)

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


# ---------------------------------------------------------------- the allocation


def phase_steps(total_steps: int, config: SnellaArgs) -> tuple[int, int]:
    """(warm-up steps, final-phase steps) of a ``total_steps`` schedule."""
    return round(config.warmup_fraction * total_steps), round(config.final_fraction * total_steps)


def keep_schedule(step: int, total_steps: int, config: SnellaArgs) -> float:
    """Global keep ratio after optimizer step ``step`` (0: before the first step).

    ``initial_keep`` through the warm-up, a cubic decrease to ``final_keep`` at
    ``total_steps - final steps``, then ``final_keep`` (AdaLoRA's budget schedule).

    Example:
        >>> keep_schedule(5, 10, SnellaArgs(initial_keep=0.9, final_keep=0.1))
        0.2
    """
    warmup, final = phase_steps(total_steps, config)
    if step <= warmup:
        return config.initial_keep
    progress = min(1.0, (step - warmup) / max(1, total_steps - final - warmup))
    return config.final_keep + (config.initial_keep - config.final_keep) * (1.0 - progress) ** 3


def allocate(scores: Sequence[float], sizes: Sequence[int], volume: int) -> list[int]:
    """Split ``volume`` entries among layers in proportion to ``scores``, none above its size.

    Water-filling: a layer whose share exceeds its size is filled and the excess is
    shared again among the others. Layers without a score share what the scored ones
    cannot take, in proportion to size (so all-zero scores give one keep ratio).
    Returns whole counts that sum to ``min(volume, sum(sizes))``.

    Example:
        >>> allocate([3.0, 1.0], [10, 100], 40)
        [10, 30]
    """
    size = torch.tensor(sizes, dtype=torch.float64)
    score = torch.nan_to_num(torch.tensor(scores, dtype=torch.float64)).clamp_min(0.0)
    volume = min(volume, int(size.sum()))
    share = torch.zeros_like(size)
    open_ = torch.ones(len(sizes), dtype=torch.bool)
    while (rest := volume - float(share.sum())) > 1e-6 and open_.any():
        weight = torch.where(open_, score, 0.0)
        if weight.sum() <= 0:
            weight = torch.where(open_, size, 0.0)
        share = torch.minimum(share + rest * weight / weight.sum(), size)
        filled = open_ & (share >= size)
        if not filled.any():
            break
        open_ &= ~filled
    counts = share.floor()
    short = volume - int(counts.sum())  # rounding: give the largest remainders one more
    if short > 0:
        remainder = torch.where(counts < size, share - counts, -1.0)
        counts[remainder.argsort(descending=True)[:short]] += 1
    return [int(c) for c in torch.minimum(counts, size)]


class SnellaAllocator:
    """Layer-level competition: importance EMAs and each layer's ``keep``.

    ``step(step)`` is the trainer's ``on_optimizer_step``: it reads the factors'
    gradients of the step just taken, updates the EMAs, and sets every layer's ``keep``
    for the next forward passes, the total following ``keep_schedule``.
    """

    def __init__(self, layers: dict[str, SnellaLinear], config: SnellaArgs, total_steps: int):
        self.layers = layers
        self.config = config
        self.total_steps = max(1, total_steps)
        self.sizes = [layer.weight.numel() for layer in layers.values()]
        self._sensitivity: dict[str, torch.Tensor] = {}  # EMA of |p * grad|, per factor entry
        self._uncertainty: dict[str, torch.Tensor] = {}  # EMA of |sensitivity - its EMA|

    def allocation(self) -> dict[str, float]:
        """Each layer's keep ratio."""
        return {name: layer.keep_ratio for name, layer in self.layers.items()}

    def scores(self) -> list[float]:
        """Each layer's importance: mean sensitivity x uncertainty over A plus over B."""
        out = []
        for name in self.layers:
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
        for name, layer in self.layers.items():
            for factor, param in (("A", layer.snella_A), ("B", layer.snella_B)):
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

    def step(self, step: int) -> None:
        self.update_importance()
        ratio = keep_schedule(step, self.total_steps, self.config)
        volume = round(ratio * sum(self.sizes))
        warmup, _ = phase_steps(self.total_steps, self.config)
        scores = [0.0] * len(self.sizes) if step <= warmup else self.scores()
        for layer, keep in zip(
            self.layers.values(), allocate(scores, self.sizes, volume), strict=True
        ):
            layer.keep = keep


# ---------------------------------------------------------------- the method


@METHODS.register(config_cls=SnellaArgs)
def snella(config: SnellaArgs, model: nn.Module, ctx: MethodContext) -> Adapted:
    """Sparse kernelized updates of the blocks' linear layers, budget allocated by importance."""
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
    layers: dict[str, SnellaLinear] = {}
    for name, linear in targets:
        keep = round(config.initial_keep * linear.weight.numel())
        layer = SnellaLinear(linear, config.r, config.kernel, keep)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        layers[name] = layer
    for name, param in model.named_parameters():
        if is_classifier_param(name, ctx.classifier):
            param.requires_grad_(True)
    allocator = SnellaAllocator(layers, config, ctx.total_steps)
    log.info(
        "snella: %d layers, rank %d, %s kernel, keep %.3g -> %.3g over %d steps",
        len(layers),
        config.r,
        config.kernel,
        config.initial_keep,
        config.final_keep,
        allocator.total_steps,
    )
    return Adapted(model, on_optimizer_step=allocator.step)
