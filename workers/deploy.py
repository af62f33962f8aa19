"""The deployment phase of a trial: the trained model as it would ship, measured.

The question behind the seed papers is what to *deploy* on a small device. After a
trial trains, this phase (the grid's ``deploy:`` section, the spec's ``deploy`` field)
builds the shipped model and measures it, so that the deployment-aware NetScore
variants and the Pareto front can use inference cost:

1. merge: a copy of the trained model with its adapters folded into the base weights
   (``workers.cost.inference_model`` with ``dequantize``): LoRA and AdaLoRA by peft,
   QLoRA dequantized then merged in fp32, SNELLA's sparse update added to the weight,
   BitFit and full fine-tuning trivially (nothing to merge). This is variant ``float``,
   the reference of every ratio, always measured;
2. variants: post-training quantization of that copy (``workers.quantization``):
   ``int8`` (weights only, any backbone), ``w8a8`` (int8 weights and linear-layer
   inputs, calibrated on ``calibration_batches`` training batches), and on Mamba
   backbones only (elsewhere the variant is skipped, its reason in the results):
   ``quamba`` (Quamba's W8A8 recipe: per-tensor weights, int8 outputs, full-width
   Hadamard, its percentile observer) and ``w8a8_ssm`` (our finer recipe: per-channel
   weights, block Hadamard, percentile-clipped scan operands, grouped B and C;
   ``quamba2`` is its former name, kept for existing grids: it is not Quamba2's recipe);
3. measure each: top-1 accuracy on the test split (the caller's ``evaluate``), inference
   latency at batch 1 and at the batch size (median, warm-up excluded, synchronised)
   and peak memory (``workers.cost.measure_inference``; weights counted as stored: int8
   codes + scales for the quantized ones), size of its safetensors file on disk;
4. export (``export``): ``merged`` keeps every variant's safetensors file
   (``<variant>.safetensors``: its state dict, int8 codes and scales included),
   ``adapter`` keeps only the trained parameters (``adapter.safetensors``: adapters,
   biases, the head, under the trained model's names), ``none`` keeps nothing; files
   go to the trial's artifacts folder (a local folder or a URI, copied through pyarrow).

No int8 kernel runs in this version, on any device: quantization is simulated
(quantize-dequantize, see ``workers.quantization``) and its results are labelled
``simulated``: accuracy is the int8 model's, memory and size are those of the int8
storage, latency is float latency plus the rounding's (not a speed-up to expect).
Everything runs in fp32, whatever the trial's training precision.

A variant that fails (an error, out of memory) is a result with its reason, not a
failed trial: the training results stand.

Example:
    >>> config = DeployConfig(variants=("int8", "w8a8"))
    >>> config.variants, config.ship
    (('float', 'int8', 'w8a8'), 'w8a8')
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from orchestrator.records import write_file
from orchestrator.spec import is_int, is_number
from workers.backbones import MAMBA, family
from workers.batch_fit import fit_batch, with_halving
from workers.cost import (
    inference_model,
    measure_inference,
    one_image_forward_bytes,
    weight_bytes,
)
from workers.memory import MB, OverBudget
from workers.quantization import MAMBA_RECIPES, calibrates, quantize_model, simulation_tensors

log = logging.getLogger(__name__)

# canonical order: least to most processed ("quamba2": former name of "w8a8_ssm")
VARIANTS = ("float", "int8", "w8a8", "quamba", "w8a8_ssm", "quamba2")
EXPORTS = ("merged", "adapter", "none")
# Timed forwards per batch size (median) after untimed warm-up ones.
REPEATS = 10
WARMUP = 3


@dataclass(frozen=True)
class DeployConfig:
    """The grid's ``deploy:`` section. Resolved: ``float`` always among the variants (the
    reference), variants in ``VARIANTS`` order, ``ship`` named."""

    variants: tuple[str, ...] = ("float", "int8")  # what to build and measure
    ship: str = ""  # the variant of the record's flat deploy_* columns ("": the last listed)
    calibration_batches: int = 4  # training batches that calibrate the activations' ranges
    percentile: float = 99.99  # w8a8_ssm: percentile of |x| that clips the scan's operands
    bc_groups: int = 4  # w8a8_ssm: groups of state channels with their own B and C scales
    export: str = "merged"  # merged | adapter | none (see the module doc)

    def __post_init__(self) -> None:
        variants = (self.variants,) if isinstance(self.variants, str) else self.variants
        if not isinstance(variants, list | tuple) or not variants:
            raise ValueError(f"variants must be a non-empty list of {list(VARIANTS)}")
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant {unknown[0]!r}; valid: {', '.join(VARIANTS)}")
        if len(set(variants)) != len(variants):
            raise ValueError(f"variants must not repeat, got {list(variants)}")
        variants = tuple(v for v in VARIANTS if v in variants or v == "float")
        object.__setattr__(self, "variants", variants)
        object.__setattr__(self, "ship", self.ship or variants[-1])
        problems = []
        if self.ship not in variants:
            problems.append(f"ship must be one of the variants {list(variants)}, got {self.ship!r}")
        if not is_int(self.calibration_batches) or self.calibration_batches < 1:
            problems.append(
                f"calibration_batches must be an integer >= 1, got {self.calibration_batches!r}"
            )
        if not is_number(self.percentile) or not 50.0 < self.percentile <= 100.0:
            problems.append(f"percentile must be a number in (50, 100], got {self.percentile!r}")
        if not is_int(self.bc_groups) or self.bc_groups < 1:
            problems.append(f"bc_groups must be an integer >= 1, got {self.bc_groups!r}")
        if self.export not in EXPORTS:
            problems.append(f"export must be one of {list(EXPORTS)}, got {self.export!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """The resolved section as plain JSON values (what a TrialSpec carries)."""
        return {**dataclasses.asdict(self), "variants": list(self.variants)}


def not_applicable(variant: str, backbone: str) -> str:
    """Why ``variant`` cannot be built for ``backbone`` ("" when it can)."""
    if variant in MAMBA_RECIPES and (own := family(backbone)) != MAMBA:
        return f"{variant} applies to Mamba backbones only; {backbone} is of the {own} family"
    return ""


@dataclass
class VariantResult:
    """What one deployed variant measured (units in the names; sizes in MiB)."""

    variant: str
    accuracy: float | None = None  # top-1 on the test split, fraction
    latency_ms_b1: float | None = None  # median forward, batch 1
    latency_ms_batch: float | None = None  # median forward, the trial's batch size
    peak_mem_mb_b1: float | None = None  # stored weights + input + forward peak, batch 1
    peak_mem_mb_batch: float | None = None
    batch_size: int | None = None  # images of the *_batch figures (fitted to the budget)
    calibration_batch_size: int | None = None  # images per calibration forward (halved on a stop)
    size_mb: float | None = None  # its safetensors file
    simulated: bool = False  # quantize-dequantize in float, no int8 kernel
    file: str = ""  # where its file was exported ("" = measured, not kept)
    skipped: str = ""  # why it has no figures (not applicable, or failed: ...)


@dataclass
class Deployment:
    """Every variant's results; ``ship`` names the one the record's flat columns take."""

    ship: str
    merged: bool | None  # as InferenceCost.merged: None = the model had no adapters
    variants: dict[str, VariantResult] = field(default_factory=dict)
    artifacts: str = ""  # folder or URI of the exported files ("" = nothing exported)
    batch_size: int | None = None  # the phase's batch: the requested one, fitted to the budget

    @property
    def shipped(self) -> VariantResult:
        return self.variants[self.ship]

    def to_json(self) -> str:
        """variant -> its figures as JSON, variants in order (the record's ``deploy_results``)."""
        rows = {name: dataclasses.asdict(r) for name, r in self.variants.items()}
        return json.dumps(rows, allow_nan=False)


def deploy(
    model: nn.Module,
    config: DeployConfig,
    *,
    backbone: str,
    size: int,
    batch_size: int,
    device: torch.device,
    calibration: Sequence[torch.Tensor],
    evaluate: Callable[[nn.Module], float],
    artifacts_dir: str | None = None,
    metadata: dict[str, str] | None = None,
    budget_bytes: int | None = None,
    resident_bytes: int = 0,
) -> Deployment:
    """Merge, quantize, measure and export the trained ``model`` (left unchanged).

    ``calibration``: input batches from the training split; ``evaluate(model)``: its
    top-1 accuracy on the test split; ``artifacts_dir``: where exported files go (None:
    nothing is kept); ``metadata``: strings stored in every exported file's header.
    ``budget_bytes``: the batch of the measurements and of calibration is fitted to it
    (``workers.batch_fit``): ``resident_bytes`` (the trained model, what else the trial
    holds) + the merged copy and one variant built from it + one forward; a phase that
    does not fit at batch 1 leaves every variant skipped with the reason.

    Example:
        >>> out = deploy(model, DeployConfig(), backbone="vit_test", size=32,
        ...              batch_size=64, device=torch.device("cpu"), calibration=[xb],
        ...              evaluate=lambda m: accuracy(m))  # doctest: +SKIP
        >>> out.shipped.size_mb / out.variants["float"].size_mb  # doctest: +SKIP
        0.27
    """
    try:
        reference, merged = inference_model(model, size, device, dequantize=True)
    except torch.OutOfMemoryError as exc:  # the trial keeps its training results
        return _not_deployed(config, f"the merged copy does not fit ({str(exc).splitlines()[0]})")
    try:
        batch = _fit_batch(reference, size, batch_size, device, budget_bytes, resident_bytes)
    except OverBudget as exc:
        return _not_deployed(config, str(exc))
    if batch < batch_size:
        calibration = [c for xb in calibration for c in xb.split(batch)]
    export = config.export if artifacts_dir else "none"
    if config.export != "none" and not artifacts_dir:
        log.info("deploy: no artifacts folder given, nothing is exported")
    out = Deployment(config.ship, merged, artifacts=artifacts_dir if export != "none" else "")
    header = {**(metadata or {}), "backbone": backbone, "merged": str(merged)}
    with tempfile.TemporaryDirectory(prefix="vramsweep-deploy-") as scratch:
        if export == "adapter":
            trained = {
                n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad
            }
            path = Path(scratch) / "adapter.safetensors"
            safetensors.torch.save_file(trained, path, metadata=header)
            _publish(path, f"{artifacts_dir}/{path.name}")
        ctx = _Context(
            config=config,
            backbone=backbone,
            size=size,
            batch_size=batch,
            device=device,
            calibration=calibration,
            evaluate=evaluate,
            scratch=Path(scratch),
            export_to=artifacts_dir if export == "merged" else None,
            header=header,
            budget_bytes=budget_bytes,
            resident_bytes=resident_bytes,
            reference_bytes=weight_bytes(reference),
        )
        for variant in config.variants:
            out.variants[variant] = _variant(variant, reference, ctx)
    if out.shipped.skipped:
        log.warning("deploy: the shipped variant %s has no figures", config.ship)
    out.batch_size = batch
    return out


def _not_deployed(config: DeployConfig, why: str) -> Deployment:
    """Every variant skipped for ``why``: the trial keeps its training results."""
    why = f"failed: {why}"
    log.warning("deploy: %s", why)
    variants = {v: VariantResult(v, simulated=v != "float", skipped=why) for v in config.variants}
    return Deployment(config.ship, None, variants)


def _fit_batch(
    reference: nn.Module,
    size: int,
    requested: int,
    device: torch.device,
    budget_bytes: int | None,
    resident_bytes: int,
) -> int:
    """The phase's batch: ``requested`` halved until ``resident_bytes``, the merged copy
    and one variant of it (two copies of its weights) and one forward (the copy's batch-1
    forward per image, scaled) fit ``budget_bytes``; ``requested`` without a budget."""
    if budget_bytes is None:
        return requested
    return fit_batch(
        per_image_bytes=one_image_forward_bytes(reference, size, device),
        resident_bytes=resident_bytes + 2 * weight_bytes(reference),
        budget_bytes=budget_bytes,
        requested=requested,
        floor=1,
        phase="deployment",
    ).batch_size


@dataclass(frozen=True)
class _Context:
    """What every variant of one deployment is built and measured with."""

    config: DeployConfig
    backbone: str
    size: int
    batch_size: int
    device: torch.device
    calibration: Sequence[torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    scratch: Path  # a temporary folder for the files
    export_to: str | None  # folder or URI that keeps the variants' files
    header: dict[str, str]  # metadata of every file
    budget_bytes: int | None = None  # the trial's budget: each variant's batch fits it
    resident_bytes: int = 0  # held beside every variant: the trained model, the trial's rest
    reference_bytes: int = 0  # the merged copy's weights, held beside a quantized variant


def _variant(variant: str, reference: nn.Module, ctx: _Context) -> VariantResult:
    """Build ``variant`` from the merged float ``reference`` and measure it; a failure is
    the result's ``skipped`` reason."""
    result = VariantResult(variant, simulated=variant != "float")
    if reason := not_applicable(variant, ctx.backbone):
        result.skipped = reason
        log.info("deploy: %s skipped: %s", variant, reason)
        return result
    try:
        # float: the merged copy itself; the others a quantized copy of it
        built = reference
        if variant != "float":
            built, result.calibration_batch_size = _quantized(variant, reference, ctx)
        result.accuracy = ctx.evaluate(built)
        cost = measure_inference(
            built,
            ctx.size,
            ctx.batch_size,
            ctx.device,
            repeats=REPEATS,
            warmup=WARMUP,
            not_stored=simulation_tensors(built),
            budget_bytes=ctx.budget_bytes,
            resident_bytes=ctx.resident_bytes + (0 if built is reference else ctx.reference_bytes),
            phase="deployment",
        )
        result.latency_ms_b1, result.latency_ms_batch = cost.latency_ms_b1, cost.latency_ms_batch
        result.peak_mem_mb_b1 = cost.peak_mem_mb_b1
        result.peak_mem_mb_batch = cost.peak_mem_mb_batch
        result.batch_size = cost.batch_size
        path = ctx.scratch / f"{variant}.safetensors"
        safetensors.torch.save_model(built, str(path), metadata={**ctx.header, "variant": variant})
        result.size_mb = path.stat().st_size / MB
        if ctx.export_to is not None:
            result.file = _publish(path, f"{ctx.export_to}/{path.name}")
        path.unlink()
    except Exception as exc:  # noqa: BLE001 - a variant that fails is a result
        result.skipped = f"failed: {type(exc).__name__}: {exc}"
        log.warning("deploy: %s failed", variant, exc_info=True)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _quantized(variant: str, reference: nn.Module, ctx: _Context) -> tuple[nn.Module, int | None]:
    """A copy of ``reference`` quantized by ``variant``, calibrated on the phase's batches,
    and the images per calibration forward (None: weight-only, no calibration). An
    over-budget stop or out-of-memory error while calibrating halves the calibration
    batches and builds it again (``workers.batch_fit.with_halving``)."""

    def build(batch: int) -> nn.Module:
        calibration = [part for xb in ctx.calibration for part in xb.split(batch)]
        return quantize_model(
            copy.deepcopy(reference),
            variant,
            calibration,
            percentile=ctx.config.percentile,
            bc_groups=ctx.config.bc_groups,
        )

    largest = max((len(xb) for xb in ctx.calibration), default=1)
    phase = f"deployment ({variant} calibration)"
    built, batch = with_halving(build, largest, 1, phase, ctx.device)
    if batch < largest:
        log.warning("deploy: %s calibrated in batches of %d to fit the budget", variant, batch)
    return built, batch if calibrates(variant) else None


def _publish(local: Path, target: str) -> str:
    """Copy the finished file ``local`` to ``target`` (a local path or a URI), never as
    half a file (``orchestrator.records.write_file``). Returns ``target``."""
    return write_file(target, local.read_bytes())
