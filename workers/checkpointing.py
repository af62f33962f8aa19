"""Gradient-checkpointing strategies: per block, what to keep for backward and what to recompute.

A backbone's *blocks* are its chain of blocks as ``workers.structure.find_blocks`` finds
them (ViT: ``blocks.3``; TinyViT: ``stages.1.blocks.0``; MobileNet: the stage ``blocks.2``;
ResNet: ``layer2.1``; Swin: ``layers.1.blocks.0``; any timm model): one block-sequence
interface for every backbone. Each block runs in one of six modes:

- ``save``: plain autograd, every activation kept;
- ``pointwise``: plain autograd, except that the outputs of norms and activations are
  not kept but recomputed in backward from the inputs their own autograd nodes keep
  (``workers.pointwise_recompute``: op granularity at almost no cost);
- ``matmul``: ``pointwise``, and the outputs of linear layers and of fused attention
  are not kept either but recomputed in backward from the inputs their nodes keep (a
  ViT block keeps its input and its residual sum only): a step between ``pointwise``
  and ``recompute`` in bytes, at about ``recompute``'s cost per byte freed;
- ``selective``: non-reentrant checkpoint with a selective policy: outputs of the
  expensive ops (matmuls, convolutions, attention kernels) are kept, the cheap
  memory-heavy ops (norms, activations, softmax, adds) are recomputed in backward;
- ``recompute``: non-reentrant checkpoint of the whole block: only its input is kept;
- ``compiled``: the block runs under ``torch.compile``, whose partitioner chooses what
  to keep within PyTorch's own activation memory budget
  (``torch._functorch.config.activation_memory_budget``, a fraction of what the
  default partition keeps). Identical blocks share one compilation (regional
  compilation: the compile time of one block, not of the model).

The mode is installed by replacing ``forward`` on the block instance, so module names
(and with them adapters and state dicts) are untouched and every PEFT method composes.
RNG state is restored for the recompute (``preserve_rng_state``), so dropout and
drop_path see the same draws and the gradients are those of plain autograd.

Strategies (the registry) choose the modes: ``none``, ``static`` (every k-th block
recomputed), ``adaptive``, which profiles every block on the first batch and lets
the exact planner of ``workers.checkpoint_plan`` pick, per block, the mode that fits
the trial's memory budget at the least recompute time, and ``compiled`` (every block
compiled under PyTorch's budget, so that sweeps compare the planner with it).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from workers import checkpoint_plan
from workers.block_compiler import BlockCompiler
from workers.memory import ActivationMeter, sync
from workers.pointwise_recompute import RecomputePointwise
from workers.registry import NoArgs, Registry
from workers.structure import find_blocks

if TYPE_CHECKING:
    from workers.profile_cache import ProfileCache

log = logging.getLogger(__name__)

CHECKPOINTING = Registry("checkpointing")
MODES = ("save", "pointwise", "selective", "recompute", "compiled", "matmul")
PROFILED = "profiled"  # tag of a strategy that needs the block profile to choose
COMPILES = "compiles"  # tag of a strategy whose blocks run compiled (no block profile)

_aten = torch.ops.aten
# Ops whose outputs the selective mode keeps: the expensive ones. Everything else
# (norms, activations, softmax, adds, views) is recomputed from them in backward.
EXPENSIVE_OPS = frozenset(
    op
    for name in (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "convolution",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(_aten, name)
    for op in (getattr(_aten, name).default,)
)


class KeepForRecompute(torch.autograd.Function):
    """Identity that saves its input for backward.

    A checkpointed block keeps its input alive (it is needed for the recompute) but
    outside autograd's saved tensors, where memory meters that hook
    ``saved_tensors_hooks`` would not see it. Saving it here costs nothing (one more
    reference to the same storage) and makes that memory visible to such meters.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op in EXPENSIVE_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_SELECTIVE_CONTEXT = functools.partial(create_selective_checkpoint_contexts, _selective_policy)


_NORMS_WITH_STATS = (nn.modules.batchnorm._BatchNorm,)


def _stats_once(block: nn.Module, plain: Callable[..., Any]) -> Callable[..., Any]:
    """``plain`` for a checkpoint: the recompute (every call after the first) leaves the
    BatchNorm running statistics as the forward left them, so that a checkpointed
    block updates them once per step, as plain autograd does."""
    norms = [m for m in block._vramsweep_norms if m.training]
    if not norms:
        return plain
    calls = [0]

    def run(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            return plain(*args, **kwargs)
        # momentum 0 leaves the running statistics as they are (still normalising with
        # batch statistics). A Python attribute, not a tensor op: the selective mode
        # replays the forward's ops and must see the same ones. (num_batches_tracked
        # still counts the recompute; it only matters for momentum=None, a cumulative
        # average that timm's backbones do not use.)
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.momentum = 0.0
        try:
            return plain(*args, **kwargs)
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum

    return run


def _run(block: nn.Module, plain: Callable[..., Any], mode: str, x: Any, *args: Any, **kw: Any):  # noqa: ANN202
    if mode == "save" or not (torch.is_grad_enabled() and block.training):
        return plain(x, *args, **kw)
    if not (isinstance(x, torch.Tensor) and x.requires_grad) and not any(
        p.requires_grad for p in block.parameters()
    ):
        # a frozen block below every trained parameter builds no graph: checkpointing
        # it would only keep its input alive
        return plain(x, *args, **kw)
    if mode == "compiled":
        return block._vramsweep_compiled(x, *args, **kw)
    if mode in ("pointwise", "matmul"):
        with RecomputePointwise(x, matmul=mode == "matmul"):
            return plain(x, *args, **kw)
    if isinstance(x, torch.Tensor) and x.requires_grad:
        x = KeepForRecompute.apply(x)
    plain = _stats_once(block, plain)
    if mode == "selective":
        # respect_saved_tensors_hooks: what the policy keeps is seen by memory meters
        return checkpoint(
            plain,
            x,
            *args,
            use_reentrant=False,
            context_fn=_SELECTIVE_CONTEXT,
            respect_saved_tensors_hooks=True,
            **kw,
        )
    return checkpoint(plain, x, *args, use_reentrant=False, **kw)


def set_mode(block: nn.Module, mode: str) -> None:
    """Run ``block`` in ``mode`` (one of ``MODES``) from its next forward on."""
    if mode not in MODES:
        raise ValueError(f"unknown checkpointing mode {mode!r}; valid: {', '.join(MODES)}")
    if mode == "compiled" and not hasattr(block, "_vramsweep_compiled"):
        raise ValueError("the compiled mode needs compile_blocks() first")
    if not hasattr(block, "_vramsweep_mode"):
        plain = block.forward

        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            return _run(block, plain, block._vramsweep_mode, x, *args, **kwargs)

        block.forward = forward
        block._vramsweep_plain_forward = plain
        # found once, not on every forward
        block._vramsweep_norms = [m for m in block.modules() if isinstance(m, _NORMS_WITH_STATS)]
    block._vramsweep_mode = mode


def mode_of(block: nn.Module) -> str:
    return getattr(block, "_vramsweep_mode", "save")


def block_modes(model: nn.Module) -> dict[str, str]:
    """The current mode of every block, in forward order."""
    return {name: mode_of(block) for name, block in find_blocks(model)}


# the modes a plan gives its blocks (``compiled`` is a strategy's alone), as counted
PLAN_MODES = tuple(m for m in MODES if m != "compiled")


def count_modes(modes: Iterable[str]) -> str:
    """Blocks per mode of ``PLAN_MODES``, as 'save/pointwise/...' counts."""
    modes = list(modes)
    return "/".join(str(modes.count(m)) for m in PLAN_MODES)


# ---------------------------------------------------------------- profiling


@dataclass(frozen=True)
class BlockProfile:
    """What one block costs in each mode, measured on one batch (bytes, seconds)."""

    name: str
    input_bytes: int  # the block's input, kept by the checkpointed modes
    gap_bytes: int  # saved between the previous block and this one (downsampling, ...)
    saved_bytes: int  # saved for backward in plain autograd (``save``)
    selective_bytes: int | None  # kept by the selective policy (besides the input);
    # None: the block mutates a kept output in place, so the mode does not apply
    forward_s: float  # extra seconds per step of ``recompute`` (measured vs ``save``)
    cheap_s: float  # extra seconds per step of ``selective`` (measured vs ``save``)
    frozen: bool = False  # builds no graph (input and parameters need no gradient)
    rematerialised: int | None = None  # saved_bytes without the input (None: same)
    pointwise_bytes: int | None = None  # saved in ``pointwise`` (input included; None: n/a)
    pointwise_s: float = 0.0  # extra seconds per step of ``pointwise`` (measured vs ``save``)
    matmul_bytes: int | None = None  # saved in ``matmul`` (input included; None: n/a)
    matmul_s: float = 0.0  # extra seconds per step of ``matmul`` (measured vs ``save``)

    @property
    def checkpointed_peak(self) -> int:
        """Bytes alive for a checkpointed block while its backward runs: its kept input
        and its re-materialised activations (the input counted once)."""
        inner = self.saved_bytes if self.rematerialised is None else self.rematerialised
        return self.input_bytes + inner

    def options(self) -> tuple[checkpoint_plan.Option, ...]:
        """The planner's view: kept bytes, backward peak, recompute time per mode.

        While a checkpointed block's backward runs, its activations are re-materialised
        next to what it kept: peak = input + re-materialised bytes in both modes.
        """
        gap = self.gap_bytes  # alive from before this block until after its backward
        if self.frozen:
            return (checkpoint_plan.Option("save", gap, gap),)
        peak = gap + self.checkpointed_peak
        save = checkpoint_plan.Option("save", gap + self.saved_bytes, gap + self.saved_bytes)
        whole = checkpoint_plan.Option("recompute", gap + self.input_bytes, peak, self.forward_s)
        options = [save, whole]
        if self.pointwise_bytes is not None and self.pointwise_bytes < self.saved_bytes:
            # In backward it holds what it kept, the tensors one node rebuilds, and the
            # gradients, which the accounting does not count. The plain peak bounds the
            # first two and leaves room for the third (ViT-S at half the activations: a
            # plan to kept + rebuilt bytes measures a resident peak 4 MiB over budget).
            kept = gap + self.pointwise_bytes
            options.append(
                checkpoint_plan.Option("pointwise", kept, save.peak_bytes, self.pointwise_s)
            )
        if self.matmul_bytes is not None and self.matmul_bytes < self.saved_bytes:
            # the same bound: what it rebuilds at once is what the plain block keeps
            kept = gap + self.matmul_bytes
            options.append(checkpoint_plan.Option("matmul", kept, save.peak_bytes, self.matmul_s))
        if self.selective_bytes is not None and self.selective_bytes < self.saved_bytes:
            # (else not applicable, or dominated: with frozen weights plain autograd may
            # keep less than the policy: a frozen matmul keeps no input for a weight grad)
            kept = gap + self.input_bytes + self.selective_bytes
            options.append(checkpoint_plan.Option("selective", kept, max(peak, kept), self.cheap_s))
        return tuple(options)

    def peak_in(self, mode: str) -> int:
        """Bytes alive for this block while its backward runs, in ``mode``."""
        if self.frozen:
            return 0
        if mode in ("save", "pointwise", "matmul"):
            return self.saved_bytes
        return self.checkpointed_peak


HEAD = "(after the blocks)"


@dataclass(frozen=True)
class Profile:
    """Every block's costs, and the bytes saved outside the blocks: before the first
    block (``prefix_bytes``: the stem, alive through every block's backward), between
    blocks (each block's ``gap_bytes``) and after the last (``tail_bytes``: final
    norm and head, freed before the blocks' backward starts)."""

    blocks: tuple[BlockProfile, ...]
    prefix_bytes: int
    tail_bytes: int

    @property
    def outside_bytes(self) -> int:
        return self.prefix_bytes + self.tail_bytes + sum(b.gap_bytes for b in self.blocks)

    def costs(self) -> list[checkpoint_plan.BlockCost]:
        """The chain the planner sees (the stem's bytes excluded: a constant); the head
        is a last pseudo-block whose only option keeps ``tail_bytes``."""
        tail = checkpoint_plan.Option("save", self.tail_bytes, self.tail_bytes)
        return [checkpoint_plan.BlockCost(b.name, b.options()) for b in self.blocks] + [
            checkpoint_plan.BlockCost(HEAD, (tail,))
        ]

    @property
    def unconstrained_bytes(self) -> int:
        """Activation bytes of a step with every block in ``save`` mode."""
        return self.outside_bytes + sum(b.saved_bytes for b in self.blocks)


def profile_blocks(
    model: nn.Module,
    forward: Callable[[], torch.Tensor],
    repeats: int = 5,
    context: Callable[[], Any] | None = None,
    timed: bool = True,
) -> Profile:
    """Measure every block of ``model`` on the batch that ``forward()`` runs.

    The model first runs with every block recomputed (the least memory a step can
    take), to capture each block's input and the bytes saved outside the blocks.
    Each block then runs alone: plain (bytes saved) and under the selective policy
    (bytes kept), then forward + backward in each mode, timed (the extra time of a
    mode over plain autograd is its cost). Only one block's activations exist at a
    time. RNG state and buffers (BatchNorm running
    statistics) are restored afterwards, so profiling does not change the trial.
    ``timed=False`` measures bytes only.
    """
    blocks = find_blocks(model)
    previous = {name: mode_of(block) for name, block in blocks}
    device = next(model.parameters()).device
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    inputs: dict[str, _BlockCall] = {}

    def capture(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs.setdefault(name, _BlockCall.of(args, kwargs))

        return hook

    hooks = [b.register_forward_pre_hook(capture(n), with_kwargs=True) for n, b in blocks]
    try:
        for _, block in blocks:
            set_mode(block, "recompute")
        meter = ActivationMeter(model, blocks)
        try:
            with meter:
                forward()  # output dropped: its graph is freed at once
        finally:
            meter.remove()
        for h in hooks:
            h.remove()
        hooks = []
        profiles = []
        kept_before = 0  # what the blocks so far kept (recompute mode: their inputs)
        previous_entry = 0
        prefix = 0
        called = [(n, b) for n, b in blocks if n in inputs]  # a block forward skips: no cost
        for i, (name, block) in enumerate(called):
            entry = meter.entry_bytes.get(name, previous_entry)
            if i == 0:
                prefix, gap = entry, 0
            else:
                gap = max(0, entry - previous_entry - kept_before)
            with context() if context else nullcontext():
                one = _profile_one(name, block, inputs[name], gap, device, repeats if timed else 0)
            profiles.append(one)
            kept_before = 0 if one.frozen else one.input_bytes
            previous_entry = entry
        tail = max(0, meter.peak_bytes - previous_entry - kept_before)
    finally:
        for h in hooks:
            h.remove()
        for name, block in blocks:
            set_mode(block, previous[name])
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
    return Profile(tuple(profiles), prefix, tail)


@dataclass(frozen=True)
class _BlockCall:
    """A block's first input (detached), whether it needed a gradient, and the other
    arguments of the call (replayed as they were)."""

    x: torch.Tensor
    needs_grad: bool
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @classmethod
    def of(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _BlockCall:
        x = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"a block's first argument must be a tensor, got {type(x).__name__}")
        rest = tuple(_detached(a) for a in args[1:])
        kw = {k: _detached(v) for k, v in kwargs.items()} if args else {}
        return cls(x.detach(), bool(x.requires_grad), rest, kw)

    def bind(self, plain: Callable[..., Any]) -> Callable[[torch.Tensor], Any]:
        if not self.args and not self.kwargs:
            return plain
        return functools.partial(_call_with, plain, self.args, self.kwargs)


def _call_with(plain: Callable[..., Any], args: tuple, kwargs: dict, x: torch.Tensor) -> Any:
    return plain(x, *args, **kwargs)


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a block's output that carry a gradient (a tensor, or a tuple/list)."""
    items = out if isinstance(out, tuple | list) else (out,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]


def _backward(out: Any, wrt: list[torch.Tensor]) -> None:
    """Gradients of every output w.r.t. ``wrt``, returned (never accumulated in .grad)."""
    outs = _outputs(out)
    if outs:
        grads = [torch.ones_like(t) for t in outs]
        torch.autograd.grad(outs, wrt, grads, allow_unused=True)


def _profile_one(
    name: str,
    block: nn.Module,
    call: _BlockCall,
    gap: int,
    device: torch.device,
    repeats: int,
) -> BlockProfile:
    plain = call.bind(block._vramsweep_plain_forward)
    x, needs_grad = call.x, call.needs_grad
    trains = any(p.requires_grad for p in block.parameters())
    if not needs_grad and not trains:
        return BlockProfile(name, 0, gap, 0, 0, 0.0, 0.0, frozen=True)
    x = x.detach().requires_grad_(needs_grad)
    input_bytes = x.numel() * x.element_size()

    meter = ActivationMeter(block)
    with meter:
        out = plain(x)
    del out
    saved = meter.peak_bytes
    meter = ActivationMeter(block, exclude=[x])
    with meter:
        out = plain(x)
    del out
    # the re-materialised activations of a checkpointed block, its (kept) input aside
    rematerialised = meter.peak_bytes

    meter = ActivationMeter(block, exclude=[x])
    with meter:
        out = checkpoint(
            plain,
            x,
            use_reentrant=False,
            context_fn=_SELECTIVE_CONTEXT,
            respect_saved_tensors_hooks=True,
        )
    selective: int | None = meter.peak_bytes
    wrt = [x] if needs_grad else [p for p in block.parameters() if p.requires_grad]
    try:  # a backward through the recompute (into no .grad) proves the mode applies
        _backward(out, wrt)
    except RuntimeError as exc:
        # an in-place op (e.g. a squeeze-excite's ReLU) overwrote a kept output
        log.info("block %s: no selective mode (%s)", name, str(exc).splitlines()[0])
        selective = None
    del out
    pointwise = _pointwise_bytes(name, block, plain, x, wrt)
    if pointwise is not None and pointwise >= saved:
        pointwise = None  # nothing recomputed (or nothing gained)
    matmul = _pointwise_bytes(name, block, plain, x, wrt, matmul=True)
    if matmul is not None and matmul >= (saved if pointwise is None else pointwise):
        matmul = None  # no linear layer's output rebuilt (or nothing gained)

    # Costs are measured, not modelled: forward + backward of the block alone in each
    # mode (gradients returned, never accumulated into .grad), minus the plain one.
    # This includes what a model of the ops would miss (the selective mode's dispatch
    # overhead, the recompute's re-saving).
    wrt = [x] if needs_grad else [p for p in block.parameters() if p.requires_grad]
    modes = ["save", "recompute"] + ([] if selective is None else ["selective"])
    modes += [] if pointwise is None else ["pointwise"]
    modes += [] if matmul is None else ["matmul"]
    elapsed = {m: [] for m in modes}
    for _ in range(repeats):
        for mode in modes:  # interleaved, so that drift hits every mode alike
            elapsed[mode].append(_fwd_bwd_time(block, plain, mode, x, wrt, device))
    if not repeats:  # bytes only (a strategy that does not plan needs no times)
        return BlockProfile(
            name,
            input_bytes,
            gap,
            saved,
            selective,
            0.0,
            0.0,
            rematerialised=rematerialised,
            pointwise_bytes=pointwise,
            matmul_bytes=matmul,
        )
    median = {m: sorted(t)[len(t) // 2] for m, t in elapsed.items()}
    # floors against timing noise: a recompute re-runs at least a forward (a third of
    # forward + backward), a selective recompute at least something
    plain_s = median["save"]
    forward_s = max(median["recompute"] - plain_s, plain_s / 3)
    cheap_s = max(median["selective"] - plain_s, plain_s / 100) if selective is not None else 0.0
    pointwise_s = max(median["pointwise"] - plain_s, plain_s / 1000) if pointwise else 0.0
    matmul_s = max(median["matmul"] - plain_s, plain_s / 1000) if matmul else 0.0
    return BlockProfile(
        name,
        input_bytes,
        gap,
        saved,
        selective,
        forward_s,
        cheap_s,
        rematerialised=rematerialised,
        pointwise_bytes=pointwise,
        pointwise_s=pointwise_s,
        matmul_bytes=matmul,
        matmul_s=matmul_s,
    )


def _pointwise_bytes(
    name: str,
    block: nn.Module,
    plain: Callable[..., Any],
    x: torch.Tensor,
    wrt: list[torch.Tensor],
    matmul: bool = False,
) -> int | None:
    """Bytes the block keeps in the ``pointwise`` mode (``matmul``: in that mode; None:
    nothing to recompute, or a backward through it fails: an in-place op changed a kept
    input)."""
    meter = ActivationMeter(block)
    with meter, RecomputePointwise(x, matmul=matmul):
        out = plain(x)
    try:
        _backward(out, wrt)
    except RuntimeError as exc:
        mode = "matmul" if matmul else "pointwise"
        log.info("block %s: no %s mode (%s)", name, mode, str(exc).splitlines()[0])
        return None
    return meter.peak_bytes


def _fwd_bwd_time(
    block: nn.Module,
    plain: Callable[..., Any],
    mode: str,
    x: torch.Tensor,
    wrt: list[torch.Tensor],
    device: torch.device,
) -> float:
    """Seconds of one forward + backward: on the CPU the process's CPU time, which other
    processes on a shared machine do not inflate (wall time there is mostly their noise)."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    sync(device)
    t0 = clock()
    _backward(_run(block, plain, mode, x), wrt)
    sync(device)
    return clock() - t0


# ---------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Budget:
    """What an adaptive strategy plans against (bytes)."""

    activation_bytes: int  # budget minus weights, grads, optimizer, batch, margin
    profile: Profile


def apply_checkpointing(
    name: str, args: dict | None, model: nn.Module, budget: Budget | None = None
) -> list[str]:
    """Apply strategy ``name`` to ``model``; returns the names of the checkpointed blocks.

    A profiled strategy (``adaptive``) needs ``budget``; the others ignore it.
    """
    modes = CHECKPOINTING.build(name, args, model, budget)
    blocks = dict(find_blocks(model))
    for block_name, block in blocks.items():
        set_mode(block, modes.get(block_name, "save"))
    chosen = [n for n, m in modes.items() if m != "save"]
    log.info("checkpointing %s: %d of %d blocks", name, len(chosen), len(blocks))
    return chosen


def needs_profile(name: str) -> bool:
    return PROFILED in CHECKPOINTING.get(name).tags


@CHECKPOINTING.register(config_cls=NoArgs)
def none(config: NoArgs, model: nn.Module, budget: Budget | None) -> dict[str, str]:
    """No checkpointing: every activation is kept for backward."""
    return {}


@dataclass(frozen=True)
class StaticConfig:
    every: int = 1  # checkpoint blocks 0, k, 2k, ... (1 = every block)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")


@CHECKPOINTING.register(config_cls=StaticConfig)
def static(config: StaticConfig, model: nn.Module, budget: Budget | None) -> dict[str, str]:
    """Recompute every k-th block, whatever the budget."""
    return {n: "recompute" for i, (n, _) in enumerate(find_blocks(model)) if i % config.every == 0}


@dataclass(frozen=True)
class AdaptiveConfig:
    margin_mb: float = 0.0  # workspace reserved beside the accounted memory, MiB
    max_replans: int = 3  # re-plans (over the budget or out of memory) before giving up
    selective: bool = True  # offer pointwise, matmul and selective (False: whole blocks only)

    def __post_init__(self) -> None:
        if self.margin_mb < 0:
            raise ValueError(f"margin_mb must be >= 0, got {self.margin_mb}")
        if self.max_replans < 0:
            raise ValueError(f"max_replans must be >= 0, got {self.max_replans}")


@CHECKPOINTING.register(config_cls=AdaptiveConfig, tags=(PROFILED,))
def adaptive(config: AdaptiveConfig, model: nn.Module, budget: Budget | None) -> dict[str, str]:
    """The least recompute time whose activation peak fits the budget (exact planner)."""
    if budget is None:
        raise ValueError("adaptive checkpointing plans on a profile: pass a Budget")
    return {n: m for n, m in zip_plan(plan_blocks(budget, config.selective)) if n != HEAD}


@dataclass(frozen=True)
class CompiledConfig:
    budget: float = 0.5  # PyTorch's activation memory budget: fraction of the default kept bytes

    def __post_init__(self) -> None:
        if not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"budget must be in [0, 1], got {self.budget}")


@CHECKPOINTING.register(config_cls=CompiledConfig, tags=(COMPILES,))
def compiled(config: CompiledConfig, model: nn.Module, budget: Budget | None) -> dict[str, str]:
    """Every block compiled, keeping what PyTorch's partitioner fits in its memory budget."""
    compile_blocks(model, BlockCompiler(config.budget))
    return {n: "compiled" for n, _ in find_blocks(model)}


def compile_blocks(model: nn.Module, compiler: BlockCompiler) -> None:
    """Give every block a forward compiled by ``compiler`` (run in the ``compiled`` mode)."""
    for _, block in find_blocks(model):
        if not hasattr(block, "_vramsweep_mode"):
            set_mode(block, "save")  # keeps the plain forward
        block._vramsweep_compiled = compiler.wrap(block._vramsweep_plain_forward)
        block._vramsweep_compiler = compiler


def compile_seconds(model: nn.Module) -> float:
    """Seconds the compilers of ``model``'s blocks spent compiling (0: none compiled)."""
    compilers = {
        id(c): c for _, b in find_blocks(model) if (c := getattr(b, "_vramsweep_compiler", None))
    }
    return sum(c.compile_s for c in compilers.values())


def plan_blocks(budget: Budget, selective: bool = True) -> checkpoint_plan.Plan:
    """The exact plan of ``budget`` (raises ``checkpoint_plan.Infeasible``)."""
    costs = budget.profile.costs()
    if not selective:
        partial = ("selective", "pointwise", "matmul")
        costs = [
            checkpoint_plan.BlockCost(c.name, tuple(o for o in c.options if o.kind not in partial))
            for c in costs
        ]
    return checkpoint_plan.plan(costs, max(0, budget.activation_bytes))


def zip_plan(plan: checkpoint_plan.Plan) -> list[tuple[str, str]]:
    return list(zip(plan.names, plan.choices, strict=True))


# ---------------------------------------------------------------- one trial's checkpointing


class Checkpointer:
    """The checkpointing of one trial: applies the strategy, and for a profiled one
    (``adaptive``) plans on the first batch and re-plans when a step goes over.

    Every strategy but ``none`` is profiled on the first batch, so that the accounted
    activation peak includes the re-materialisation of a recomputed block in backward.
    """

    def __init__(self, name: str, args: dict | None, model: nn.Module) -> None:
        self.name = name
        self.config = CHECKPOINTING.make_config(name, args)
        self.model = model
        self.adaptive = needs_profile(name)
        self.compiles = COMPILES in CHECKPOINTING.get(name).tags
        self.profile: Profile | None = None
        self.profile_s: float | None = None  # seconds profiling took (0: from the cache)
        self.profile_cached: bool | None = None
        self.plan: checkpoint_plan.Plan | None = None
        self.activation_budget: int | None = None
        self.replans = 0
        if not self.adaptive:
            apply_checkpointing(name, args, model)

    @property
    def wants_profile(self) -> bool:
        # a compiled block's re-materialisation is the partitioner's: nothing to profile
        return self.profile is None and self.name != "none" and not self.compiles

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling blocks so far (a ``compiled`` strategy; else 0)."""
        return compile_seconds(self.model) if self.compiles else 0.0

    def prepare(
        self,
        forward: Callable[[], torch.Tensor],
        budget_bytes: int,
        static_bytes: int,
        context: Callable[[], Any] | None = None,
        cache: ProfileCache | None = None,
    ) -> None:
        """Profile on the first batch (or take ``cache``'s entry); an adaptive strategy
        plans for ``budget_bytes``.

        Raises ``checkpoint_plan.Infeasible`` when even the cheapest plan does not fit.
        """
        t0 = time.perf_counter()
        profile = cache.load(self.model) if cache is not None else None
        self.profile_cached = profile is not None
        if profile is None:
            profile = profile_blocks(self.model, forward, context=context, timed=self.adaptive)
            if cache is not None:
                cache.store(self.model, profile)
            self.profile_s = time.perf_counter() - t0
        else:
            self.profile_s = 0.0
        margin = int(self.config.margin_mb * (1 << 20)) if self.adaptive else 0
        self.use(profile, budget_bytes - static_bytes - profile.prefix_bytes - margin)

    def use(self, profile: Profile, activation_budget: int | None = None) -> None:
        """Take ``profile``; an adaptive strategy also plans for ``activation_budget``
        (bytes for the blocks and the head, the stem's prefix already subtracted)."""
        self.profile = profile
        if self.adaptive and activation_budget is not None:
            self.activation_budget = activation_budget
            self._apply()

    def _apply(self) -> None:
        assert self.profile is not None and self.activation_budget is not None
        budget = Budget(self.activation_budget, self.profile)
        self.plan = plan_blocks(budget, self.config.selective)
        blocks = dict(find_blocks(self.model))
        for name, mode in zip_plan(self.plan):
            if name in blocks:
                set_mode(blocks[name], mode)
        log.info(
            "adaptive plan (activation budget %.1f MiB): %s",
            self.activation_budget / (1 << 20),
            self.plan.blocks_by_kind(),
        )

    def replan(self, tighter_by_bytes: int) -> bool:
        """Plan again for a budget ``tighter_by_bytes`` smaller; False if not possible."""
        if not self.adaptive or self.replans >= self.config.max_replans:
            return False
        assert self.activation_budget is not None
        self.replans += 1
        before = self.plan
        current = (
            self.activation_budget
            if before is None
            else min(self.activation_budget, before.peak_bytes)
        )
        self.activation_budget = current - max(1, tighter_by_bytes)
        try:
            self._apply()
        except checkpoint_plan.Infeasible:
            return False
        return before is None or self.plan.choices != before.choices

    def activation_peak(self, meter: ActivationMeter) -> int:
        """Accounted activation peak of the last step: the bytes saved by its forward,
        or, if larger, what is alive while a checkpointed block's backward runs (the
        bytes saved before the block, measured, plus its re-materialisation, profiled)."""
        peak = meter.last_bytes
        if self.profile is None:
            return peak
        modes = block_modes(self.model)
        for block in self.profile.blocks:
            mode = modes.get(block.name, "save")
            if mode != "save" and block.name in meter.entry_bytes:
                peak = max(peak, meter.entry_bytes[block.name] + block.peak_in(mode))
        return peak

    def predicted_activation_bytes(self) -> int | None:
        if self.plan is None or self.profile is None:
            return None
        return self.profile.prefix_bytes + self.plan.peak_bytes

    def checkpointed(self) -> list[str]:
        """Blocks that recompute in backward (a frozen block that builds no graph
        recomputes nothing, whatever its mode)."""
        frozen = {b.name for b in self.profile.blocks if b.frozen} if self.profile else set()
        return [n for n, m in block_modes(self.model).items() if m != "save" and n not in frozen]
