"""Compute cost of an adapted model: forward MACs, and inference latency and peak memory.

MACs are counted on one image at the trial's resolution with fvcore's conventions,
those of timm's published GMACs (its benchmark tables are fvcore counts): one per
multiply-accumulate of a matmul, convolution or attention (``torch.utils.flop_counter``'s
formulas, FLOPs / 2; biases, activations, softmax and elementwise ops count nothing),
plus per input element 5 for an affine LayerNorm or GroupNorm (4 without affine), 2
for an affine BatchNorm in eval mode (1 without; 5 / 4 in training), 1 for an adaptive
average pool. Operators without a formula count nothing (custom kernels: bitsandbytes
4-bit matmuls, mamba-ssm scans; our own scan's matmuls do count). ViT-S/16 at 224:
4.608 G (timm: 4.61); TinyViT-5M with timm's benchmark's 21,841-class head: 1.277 G
(timm: 1.28; 1.27 in its PyTorch 2.9 tables); without attention 4.250 G and 1.181 G
(timm's PyTorch 2.1 tables, whose fvcore trace missed the fused attention: 4.25, 1.18).

Inference is measured on a copy of the trained model with its adapters merged where
that is possible (``inference_model``), so the model the trial goes on using is never
changed; ``measure_inference`` measures a model that is ready as it is (the deployment
phase's variants, ``workers.deploy``):

- latency: median of ``repeats`` timed forwards after ``warmup`` untimed ones, each
  between device synchronisations, at batch 1 and at the trial's batch size;
- peak memory: the copy's parameters and buffers + the input + the peak of what the
  forward allocates. On CUDA the last term is the caching allocator's peak above the
  bytes allocated before the input existed (``cuda_allocator``); on CPU, which has no
  allocator statistics, it is the peak total of live tensor storages that the
  forward's operators return, followed to their release (``live_tensors``). Scratch
  buffers inside a kernel are invisible to the CPU figure.
- the batch: the trial's batch size, halved until the copy + the rest of the trial +
  one forward fit the trial's budget when one is given (the record's
  ``inference_batch_size_used``).

Example:
    >>> model = create_backbone("vit_test", num_classes=10)
    >>> forward_macs(model, 32, torch.device("cpu"))  # doctest: +SKIP
    3731392
    >>> inference_cost(model, 32, 64, torch.device("cpu"))  # doctest: +SKIP
    InferenceCost(latency_ms_b1=1.9, latency_ms_batch=14.2, ...)
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from workers.batch_fit import fit_batch, with_halving
from workers.memory import MB, storage_key, sync

log = logging.getLogger(__name__)

# The merged copy must compute what the trained model computes: the largest output
# difference allowed, relative to the largest output (fp32 merges differ by ~1e-6).
MERGE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class InferenceCost:
    """Inference of the adapted model at batch 1 and at the trial's batch size."""

    latency_ms_b1: float  # ms, median forward of one image
    latency_ms_batch: float  # ms, median forward of one batch
    peak_mem_mb_b1: float  # MiB, weights + input + forward peak, batch 1
    peak_mem_mb_batch: float  # MiB, the same at the batch size
    mem_source: str  # cuda_allocator | live_tensors
    # True: adapters folded into the weights; False: adapters left unmerged (they ran
    # as extra branches); None: the model has no adapter layers (full, bitfit, ...)
    merged: bool | None
    # images of the *_batch figures: the requested batch, halved to fit a budget if given
    batch_size: int | None = None


# ---------------------------------------------------------------- MACs


def call_macs(forward: Callable[[], Any]) -> int:
    """Multiply-accumulates of one call of ``forward``, without gradients (fvcore's
    conventions: see the module docstring)."""
    return sum(macs_by_operator(forward).values())


def macs_by_operator(forward: Callable[[], Any]) -> dict[str, int]:
    """``call_macs`` by operator (e.g. ``aten.addmm``; ``adaptive_avg_pool`` for pools)."""
    counter = FlopCounterMode(display=False, custom_mapping=_FVCORE_FORMULAS)
    pooled = [0]

    def pool(module: nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(module, _POOLS) and _to_one(module.output_size):
            pooled[0] += args[0].numel()  # dispatched as a mean: no operator to count

    hook = torch.nn.modules.module.register_module_forward_pre_hook(pool)
    try:
        with torch.no_grad(), counter:
            forward()
    finally:
        hook.remove()
    out = {str(op): flops // 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    if pooled[0]:
        out["adaptive_avg_pool"] = out.get("adaptive_avg_pool", 0) + pooled[0]
    return out


# fvcore's per-element costs, as FLOPs (2 per counted MAC) for the counter's total
def _per_element(shape: torch.Size, cost: int) -> int:
    return 2 * cost * math.prod(shape)


def _layer_norm(x: torch.Size, shape: Any, weight: Any = None, *args: Any, **kw: Any) -> int:
    return _per_element(x, 5 if weight is not None else 4)


def _group_norm(x: torch.Size, weight: Any = None, *args: Any, **kw: Any) -> int:
    return _per_element(x, 5 if weight is not None else 4)


def _batch_norm(
    x: torch.Size, weight: Any, bias: Any, mean: Any, var: Any, training: Any, *a: Any, **kw: Any
) -> int:
    affine = weight is not None
    if training is True:
        return _per_element(x, 5 if affine else 4)
    return _per_element(x, 2 if affine else 1)


def _batch_norm_eval(x: torch.Size, weight: Any, *args: Any, **kw: Any) -> int:
    return _per_element(x, 2 if weight is not None else 1)


def _adaptive_pool(x: torch.Size, *args: Any, **kw: Any) -> int:
    return _per_element(x, 1)


_aten = torch.ops.aten
_FVCORE_FORMULAS = {
    _aten.native_layer_norm: _layer_norm,
    _aten.native_group_norm: _group_norm,
    _aten.native_batch_norm: _batch_norm,
    _aten._native_batch_norm_legit: _batch_norm,
    _aten.cudnn_batch_norm: _batch_norm,
    _aten._native_batch_norm_legit_no_training: _batch_norm_eval,
    _aten._adaptive_avg_pool2d: _adaptive_pool,
    _aten._adaptive_avg_pool3d: _adaptive_pool,
}
_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _to_one(size: Any) -> bool:
    """An adaptive pool to one element (dispatched as ``aten.mean``, not as a pool)."""
    sizes = size if isinstance(size, tuple | list) else (size,)
    return all(s == 1 for s in sizes)


def forward_macs(model: nn.Module, size: int, device: torch.device) -> int:
    """Multiply-accumulates of one forward of one ``size`` x ``size`` image (FLOPs // 2).

    The model runs in eval mode without gradients; every module's mode is restored.
    """
    x = torch.zeros(1, 3, size, size, device=device, dtype=_input_dtype(model))
    with _eval_mode(model), _frozen(model):
        return call_macs(lambda: model(x))


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside: under ``no_grad`` a no-op view of a parameter
    (PiT's ``cls_token.expand(1, ...)``) still requires grad without a grad function, and
    the counter's module tracker fails on it."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in trainable:
            param.requires_grad_(True)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside, each module's own mode after (some are meant to differ)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (float32 if it has none)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


# ---------------------------------------------------------------- the inference copy


def _adapter_layers(model: nn.Module) -> list[nn.Module]:
    """peft tuner layers, and layers that expose ``delta_weight()`` (snella)."""
    # a model with peft layers has imported peft: no import of peft just to look
    peft_layer: Any = ()
    if "peft" in sys.modules:
        from peft.tuners.tuners_utils import BaseTunerLayer

        peft_layer = BaseTunerLayer
    return [
        m
        for m in model.modules()
        if isinstance(m, peft_layer) or callable(getattr(m, "delta_weight", None))
    ]


def _strip_patched_forwards(model: nn.Module) -> None:
    """Drop per-instance ``forward`` overrides (checkpointing modes, lbp_wht's backward).

    They are closures over the *original* modules: a deep copy keeps them, so the
    copy would run the trained model's layers. Their inference forward is the
    class's own; ``inference_model`` checks the result against the trained model.
    """
    for module in model.modules():
        if "forward" in vars(module):
            del module.forward


@torch.no_grad()
def _replace_by_linear(
    model: nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Put a plain ``nn.Linear`` holding ``weight`` and ``bias`` in place of module ``name``."""
    linear = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, linear)


@torch.no_grad()
def _fold_delta_weights(model: nn.Module) -> None:
    """Replace every layer exposing ``delta_weight()`` by a plain ``nn.Linear`` holding
    weight + delta (the update its forward adds)."""
    targets = [
        (name, m) for name, m in model.named_modules() if callable(getattr(m, "delta_weight", None))
    ]
    for name, layer in targets:
        _replace_by_linear(model, name, layer.weight + layer.delta_weight(), layer.bias)


def _four_bit_layers(model: nn.Module) -> list[nn.Module]:
    """bitsandbytes ``Linear4bit`` layers (QLoRA's frozen base)."""
    if "bitsandbytes" not in sys.modules:  # a model with 4-bit layers has imported it
        return []
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


@torch.no_grad()
def _dequantize_and_merge_4bit(model: nn.Module) -> None:
    """QLoRA's dequantize-then-merge: every peft LoRA layer over a 4-bit base becomes a
    plain fp32 ``nn.Linear`` holding the dequantized base weight + the adapters' update.

    peft's own merge re-quantizes the sum to 4 bits, which changes the function by the
    new rounding (5-15% of the output on the tiny test models); a deployment that wants
    the trained function in float (and quantizes it again on its own terms) starts here.
    """
    four_bit = {id(m) for m in _four_bit_layers(model)}
    if not four_bit:
        return
    from peft.tuners.lora import LoraLayer

    from workers.methods.qlora import dequantized_weight

    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and id(m.get_base_layer()) in four_bit
    ]
    for name, layer in targets:
        base = layer.get_base_layer()
        weight = dequantized_weight(base)
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight = weight + layer.get_delta_weight(adapter).float()
        bias = None if base.bias is None else base.bias.float()
        _replace_by_linear(model, name, weight, bias)


def _fp32_reference(model: nn.Module) -> nn.Module:
    """``model``, or a copy whose 4-bit layers compute in fp32 instead of 16 bits: the
    function a dequantized fp32 merge must reproduce (bf16 rounding of the activations
    alone moves the tiny test models' outputs by ~0.4%, above ``MERGE_TOLERANCE``)."""
    if all(m.compute_dtype in (None, torch.float32) for m in _four_bit_layers(model)):
        return model
    reference = _copy(model)
    for layer in _four_bit_layers(reference):
        layer.compute_dtype = torch.float32
    return reference


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy for inference: no training-time forward patches, no gradients."""
    clone = copy.deepcopy(model)
    _strip_patched_forwards(clone)
    for param in clone.parameters():
        param.grad = None
        param.requires_grad_(False)
    return clone


def _merged_copy(model: nn.Module, dequantize: bool) -> nn.Module | None:
    """A copy with every adapter folded into the weights; None if that is not possible.
    ``dequantize``: adapters over 4-bit bases merge into fp32 weights (see
    ``_dequantize_and_merge_4bit``); otherwise peft merges them (and re-quantizes)."""
    clone = _copy(model)
    if dequantize:
        _dequantize_and_merge_4bit(clone)
    if "peft" in sys.modules:
        from peft import PeftModel

        if isinstance(clone, PeftModel):
            try:
                clone = clone.merge_and_unload(safe_merge=True)
            except (ValueError, RuntimeError, NotImplementedError) as exc:
                log.warning("inference cost: peft cannot merge the adapters (%s)", exc)
                return None
    _fold_delta_weights(clone)
    if left := _adapter_layers(clone):
        log.warning("inference cost: %d adapter layers cannot be merged", len(left))
        return None
    return clone


def _same_function(a: nn.Module, b: nn.Module, size: int, device: torch.device) -> float:
    """Largest output difference of ``a`` and ``b`` on one random image, relative."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=gen).to(device, _input_dtype(b))
    with _eval_mode(a), _eval_mode(b), torch.inference_mode():
        ya, yb = a(x).float(), b(x).float()
    return float((ya - yb).abs().max() / yb.abs().max().clamp_min(1e-12))


def inference_model(
    model: nn.Module, size: int, device: torch.device, dequantize: bool = False
) -> tuple[nn.Module, bool | None]:
    """A copy of ``model`` for inference, adapters merged where possible.

    Returns the copy and ``merged`` (see ``InferenceCost``). Adapter layers are peft's
    (merged by ``merge_and_unload``) and layers exposing ``delta_weight()``, the dense
    update their forward adds to ``weight`` (folded into an ``nn.Linear``). The copy
    must compute the trained model's function within ``MERGE_TOLERANCE``: a merge
    that does not is dropped for an unmerged copy; an unmerged copy that does not
    raises RuntimeError. ``model`` itself is not changed.

    ``dequantize`` (the deployment phase): LoRA adapters over QLoRA's 4-bit bases merge
    into the dequantized fp32 weights, and the merge is checked against the trained
    model with its 4-bit layers computing in fp32. Without it (the trial's inference
    cost) peft's 4-bit merge changes the function, so QLoRA models stay unmerged.
    """
    if not _adapter_layers(model):
        clone, merged = _copy(model), None
    else:
        clone = _merged_copy(model, dequantize)
        reference = _fp32_reference(model) if dequantize and clone is not None else model
        if clone is not None and (gap := _same_function(clone, reference, size, device)) > (
            MERGE_TOLERANCE
        ):
            log.warning("inference cost: merging changed the outputs by %.2g: unmerged", gap)
            clone = None
        merged = clone is not None
        if clone is None:
            clone = _copy(model)
    if merged is not True and (gap := _same_function(clone, model, size, device)) > MERGE_TOLERANCE:
        raise RuntimeError(f"the inference copy computes another function (difference {gap:.2g})")
    return clone, merged


# ---------------------------------------------------------------- measurements


def inference_cost(
    model: nn.Module,
    size: int,
    batch_size: int,
    device: torch.device,
    repeats: int = 10,
    warmup: int = 3,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    budget_bytes: int | None = None,
    resident_bytes: int = 0,
) -> InferenceCost:
    """Latency and peak memory of inference with ``model`` at batch 1 and ``batch_size``.

    Measured on ``inference_model(model)`` (an extra copy of the model on ``device``),
    in eval mode under ``torch.inference_mode()`` and ``autocast()`` (the trial's
    precision). On CUDA it resets the allocator's peak statistics: read the trial's
    own peaks first. With ``budget_bytes`` the batch is fitted to it (see
    ``measure_inference``); ``resident_bytes``: what stays allocated beside the copy.

    Example:
        >>> cost = inference_cost(model, 224, 64, torch.device("cuda"))  # doctest: +SKIP
        >>> cost.latency_ms_b1, cost.peak_mem_mb_batch, cost.merged
        (3.1, 412.5, True)
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    clone, merged = inference_model(model, size, device)
    return measure_inference(
        clone,
        size,
        batch_size,
        device,
        repeats=repeats,
        warmup=warmup,
        autocast=autocast,
        merged=merged,
        budget_bytes=budget_bytes,
        resident_bytes=resident_bytes,
    )


def measure_inference(
    model: nn.Module,
    size: int,
    batch_size: int,
    device: torch.device,
    *,
    repeats: int = 10,
    warmup: int = 3,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    merged: bool | None = None,
    not_stored: Collection[torch.Tensor] = (),
    budget_bytes: int | None = None,
    resident_bytes: int = 0,
    phase: str = "inference",
) -> InferenceCost:
    """Latency and peak memory of inference with ``model`` itself (put in eval mode, on
    ``device``), measured as ``inference_cost`` describes; ``merged`` is passed through.

    ``not_stored``: tensors of the model that its weights' figure leaves out: the float
    copies that simulated quantization computes with (``workers.quantization``), whose
    stored form (int8 codes + scales) is what the figure counts.

    ``budget_bytes``: the batch is fitted to it (``workers.batch_fit``): ``resident_bytes``
    (what else stays allocated) + the model's weights + the batch-1 forward's peak per
    image (an over-estimate: its fixed part is scaled too); an over-budget stop or an
    out-of-memory error halves the batch and measures again. Not even batch 1 fitting
    is OverBudget naming ``phase``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    model.eval()
    held = weight_bytes(model)
    weights = held - _weight_bytes_of(not_stored)
    dtype = _input_dtype(model)

    def measure(batch: int) -> tuple[float, float]:
        """(median latency ms, peak MiB) at ``batch`` images."""
        x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)

        def forward() -> None:
            with torch.inference_mode(), autocast():
                model(x)

        latency = _median_ms(forward, device, repeats, warmup)
        return latency, (weights + forward_peak_bytes(forward, x, device)) / MB

    one, _ = with_halving(measure, 1, 1, phase, device)
    batch = batch_size
    if budget_bytes is not None:
        per_image = one[1] * MB - weights  # the batch-1 forward, input included
        batch = fit_batch(
            per_image_bytes=per_image,
            resident_bytes=resident_bytes + held,
            budget_bytes=budget_bytes,
            requested=batch_size,
            floor=1,
            phase=phase,
        ).batch_size
    at_batch, batch = (one, 1) if batch == 1 else with_halving(measure, batch, 1, phase, device)
    return InferenceCost(
        latency_ms_b1=one[0],
        latency_ms_batch=at_batch[0],
        peak_mem_mb_b1=one[1],
        peak_mem_mb_batch=at_batch[1],
        mem_source="cuda_allocator" if device.type == "cuda" else "live_tensors",
        merged=merged,
        batch_size=batch,
    )


def one_image_forward_bytes(model: nn.Module, size: int, device: torch.device) -> int:
    """Input + peak bytes of one eval-mode inference forward of one ``size`` px image: an
    upper bound of the bytes per image of a larger batch (the fixed part is included)."""
    x = torch.zeros(1, 3, size, size, device=device, dtype=_input_dtype(model))

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    with _eval_mode(model):
        return forward_peak_bytes(forward, x, device)


def _median_ms(
    forward: Callable[[], None], device: torch.device, repeats: int, warmup: int
) -> float:
    for _ in range(warmup):
        forward()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        forward()
        sync(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages of ``model``'s parameters and buffers."""
    return _weight_bytes_of([*model.parameters(), *model.buffers()])


def _weight_bytes_of(tensors: Collection[torch.Tensor]) -> int:
    """Bytes of the distinct storages under ``tensors``."""
    keys = {storage_key(t) for t in tensors}
    return sum(k[1] for k in keys if k is not None)


def forward_peak_bytes(forward: Callable[[], None], x: torch.Tensor, device: torch.device) -> int:
    """Input bytes + the peak bytes that one ``forward()`` allocates on top."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device) - x.numel() * x.element_size()
        torch.cuda.reset_peak_memory_stats(device)
        forward()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    tracker = _LiveTensors()
    with tracker:
        forward()
    return x.numel() * x.element_size() + tracker.peak_bytes


class _LiveTensors(TorchDispatchMode):
    """Peak total bytes of the storages that operators return while the mode is on.

    A storage is counted once, from its first operator output until the last tensor
    on it is released (weak-reference finalizers); storages that existed before (the
    weights, the input, their views) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.peak_bytes = 0
        self._bytes = 0
        self._refs: dict[tuple[int, int], int] = {}  # storage -> live tensors on it
        self._known: set[tuple[int, int]] = set()

    def __enter__(self) -> _LiveTensors:
        self._known = set()
        return super().__enter__()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        inputs = tree_leaves((args, kwargs or {}))
        for t in inputs:
            if isinstance(t, torch.Tensor) and (key := storage_key(t)) not in self._refs:
                self._known.add(key)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        key = storage_key(t)
        if key is None or key in self._known:
            return
        if key not in self._refs:
            self._refs[key] = 0
            self._bytes += key[1]
            self.peak_bytes = max(self.peak_bytes, self._bytes)
        self._refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: tuple[int, int]) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self._bytes -= key[1]
