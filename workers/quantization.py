"""Post-training quantization of a trained model to 8 bits: four recipes, simulated in float.

Weights are symmetric int8 codes, scale = max |w| / 127 (per output channel, or per
tensor for ``quamba``), each weight within scale / 2 of its stored value (round to
nearest). Activations, when quantized, are per-tensor static int8 with a scale fixed by
calibration on a few training batches. The recipes:

- ``int8``: weight-only, every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``, any backbone;
- ``w8a8``: int8 weights as ``int8`` and int8 inputs of every ``nn.Linear``, the clipping
  range the largest |x| seen in the calibration batches (min-max calibration);
- ``quamba`` (Mamba backbones): Quamba's W8A8 recipe for Mamba1 (enyac-group/Quamba,
  ``W8A8QMamba`` and ``run_quamba_calibration``), its arithmetic equal to the authors'
  observers and quantizers (tests/fixtures/official/quamba.pt):

  * every ``nn.Linear``: one weight scale per tensor (``quantize_tensor_per_tensor_absmax``)
    and int8 inputs; the product runs on the integer codes (``W8A8B16O16Linear``);
  * in the Mamba mixers, ``in_proj``, ``x_proj`` and ``dt_proj`` also round their output
    to int8 (``W8A8B8O8Linear``: round(acc * s_in / s_out * s_w)), ``dt_proj`` reads its
    input on ``x_proj``'s output scale, and the scan's u is rounded on the scale of
    ``x_proj``'s input (delta, B and C arrive as those int8 outputs);
  * ranges: min-max, except ``x_proj``'s input (the SSM input) and u: the 99.95th
    percentile of |x|, smoothed over the batches by an EMA of factor 0.01
    (``PerTensorPercentileObserver``, ``percentile_alpha`` 0.9995);
  * ``out_proj``'s input rotated by a full-width Hadamard matrix fused into its weight:
    Sylvester's for a power-of-two width (the authors' transform exactly); for 12 or 20
    times a power of two (Vim's 768, MambaVision's 640), Paley's matrix of 12 or 20 times
    Sylvester's, a Hadamard matrix of the same size but not the CUDA kernel's
    (``had_12_paley`` / 40N), so the rounding differs there; other widths fall back to
    the block-diagonal rotation;

  not reproduced: the quantized norms, embedding and causal conv (convolutions keep
  per-channel int8 weights, float input), the quantized cached SSM state (vision models
  run whole sequences), the activation truncation of its ``QAct`` (round to nearest
  here), 4-bit variants;
- ``w8a8_ssm`` (Mamba backbones; formerly ``quamba2``, a name kept for existing grids:
  it is not Quamba2's recipe): ``w8a8`` plus, in every Mamba mixer (a module owning a
  ``workers.mamba.kernels.ScanInputs``), our finer variant of Quamba's ideas:

  * a block-diagonal Hadamard rotation (blocks of the largest power of two dividing the
    width) of the inputs of ``in_proj`` and ``out_proj``, fused into their weights
    (W -> W H) and applied online to the activation (x -> x H): (x H)(W H)^T = x W^T;
  * percentile clipping (``percentile`` of |x| per batch, averaged) of the selective
    scan's input u, shared by ``x_proj``, which reads the same tensor, and of delta, B, C;
  * B and C with one scale per group of state channels (``bc_groups``; not Quamba2's
    groups, which are Mamba2's SSD groups), per-channel weights, float outputs.

  Chiang et al., "Quamba: A Post-Training Quantization Recipe for Selective State Space
  Models", ICLR 2025, https://arxiv.org/abs/2410.13229; "Quamba2", ICML 2025,
  https://arxiv.org/abs/2503.22879 (code: https://github.com/enyac-group/Quamba).

Simulation: no int8 kernel runs. Each quantized layer keeps its int8 codes and scales as
persistent buffers (what a state dict, an exported file and the memory figure hold) and
computes with their dequantized float copy, a non-persistent buffer named ``weight``
(what code reading ``layer.weight`` expects: the fused causal-conv kernel does);
activations are rounded and dequantized in place (quantize-dequantize). Accuracy is the
int8 model's; latency is float latency plus the rounding's, so it is labelled
``simulated`` in the record. The scan itself computes in float, as Quamba's kernels do
after dequantizing their int8 operands.

Calibration observes the float model (forward hooks, as Quamba's observers), then
``convert`` replaces the layers. A percentile is computed per calibration batch and
averaged over the batches (``w8a8_ssm``) or smoothed by Quamba's EMA (``quamba``): an
exact percentile over all batches would keep every activation of every batch.

Example:
    >>> model = quantize_model(model, "w8a8_ssm", calibration=[xb1, xb2])  # doctest: +SKIP
    >>> sorted({type(m).__name__ for m in model.modules()} & {"QuantLinear", "QuantScanInputs"})
    ['QuantLinear', 'QuantScanInputs']
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workers.mamba.kernels import ScanInputs
from workers.quantile import quantile

log = logging.getLogger(__name__)

QMAX = 127  # symmetric int8 codes in [-127, 127]: zero is exact, the range symmetric
TINY = 1e-8  # smallest clipping range (an all-zero channel still gets a usable scale)
# "quamba2" is the former name of "w8a8_ssm" (not Quamba2's recipe), kept for old grids
RECIPES = ("int8", "w8a8", "quamba", "w8a8_ssm", "quamba2")
MAMBA_RECIPES = ("quamba", "w8a8_ssm", "quamba2")  # they need a Mamba mixer
QUAMBA_PERCENTILE = 99.95  # Quamba's x_proj input (Mamba1): percentile_alpha 0.9995
QUAMBA_SMOOTHING = 0.01  # its percentile observer's EMA factor (percentile_sigma)


# ---------------------------------------------------------------- rounding


def scale_of(clip: torch.Tensor) -> torch.Tensor:
    """The int8 scale that maps [-clip, clip] onto [-127, 127]."""
    return clip.float().clamp_min(TINY) / QMAX


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes round(x / scale), saturated to [-127, 127]."""
    return torch.clamp(torch.round(x / scale), -QMAX, QMAX).to(torch.int8)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to its int8 grid and back (values beyond the range saturate)."""
    return (torch.clamp(torch.round(x / scale), -QMAX, QMAX) * scale).to(x.dtype)


def quantize_weight(
    weight: torch.Tensor, per_tensor: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel int8: (codes shaped like ``weight``, fp32 scales (out,)).
    ``per_tensor``: one scale for the tensor (shape (1,)), Quamba's
    ``quantize_tensor_per_tensor_absmax``."""
    flat = weight.detach().float().flatten(1)
    top = flat.abs().amax().reshape(1) if per_tensor else flat.abs().amax(dim=1)
    scale = scale_of(top)
    codes = quantize(flat, scale[:, None]).view(weight.shape)
    return codes, scale


# ---------------------------------------------------------------- Hadamard rotation


def hadamard_block(n: int) -> int:
    """The rotation's block size for a dimension of ``n``: the largest power of two that
    divides it (384 -> 128). 1 means no rotation (odd ``n``)."""
    return n & -n


def full_hadamard(n: int) -> bool:
    """Whether ``full_width`` rotation can rotate ``n`` channels at once: ``n`` is a power
    of two, or 12 or 20 times one (the widths Quamba's transform takes, 40 = 20 * 2 too)."""
    odd = n // hadamard_block(n)
    return n > 1 and odd in (1, 3, 5)


def _paley(order: int) -> torch.Tensor:
    """A Hadamard matrix of ``order`` = q + 1 (q prime, q = 3 mod 4): Paley's first
    construction, I + [[0, 1], [-1, Q]] with Q the Jacobsthal matrix of q."""
    q = order - 1
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in squares else -1.0 for i in range(1, q)])
    jacobsthal = torch.stack([chi.roll(i) for i in range(q)])  # Q[i, j] = chi(j - i)
    s = torch.zeros(order, order)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return torch.eye(order) + s


@functools.cache
def _sylvester(block: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The orthonormal Hadamard matrix of size ``block``, built once per device and
    dtype (a deployed model rotates in every forward: no copy to the device each time):
    Sylvester's for a power of two; for 12 or 20 times one, Paley's of 12 or 20 (times
    Sylvester's), another matrix than Quamba's CUDA transform (had_12_paley, 40N)."""
    odd = block // hadamard_block(block)
    h = torch.ones(1, 1) if odd == 1 else _paley(4 * odd)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(block)).to(device, dtype)


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` times the block-diagonal orthonormal Hadamard matrix H (blocks of ``block``)
    along its last dimension. H H^T = I, so (x H)(W H)^T = x W^T; Sylvester's H is also
    symmetric (rotating twice is the identity)."""
    h = _sylvester(block, x.device, x.dtype)
    shape = x.shape
    return (x.reshape(*shape[:-1], shape[-1] // block, block) @ h).reshape(shape)


# ---------------------------------------------------------------- observers


@dataclass
class RangeObserver:
    """Clipping range of an activation over the calibration batches, per group.

    ``percentile`` 100: the largest |x| seen in any batch. Below 100: that percentile of
    |x| in each batch, averaged over the batches; with ``smoothing`` s > 0, Quamba's
    ``PerTensorPercentileObserver`` instead: the interpolated percentile (as
    ``torch.quantile``) of the first batch, then moved by s of the way to each next
    batch's. Values arrive shaped (groups, n).
    """

    percentile: float = 100.0
    smoothing: float = 0.0
    _max: torch.Tensor | None = None
    _sum: torch.Tensor | None = None
    batches: int = 0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().abs().float()
        if self.percentile >= 100.0:
            top = values.amax(dim=1)
            self._max = top if self._max is None else torch.maximum(self._max, top)
        elif self.smoothing > 0.0:
            top = quantile(values, self.percentile / 100.0, dim=1)
            self._max = top if self._max is None else self._max + self.smoothing * (top - self._max)
        else:
            k = min(values.shape[1], max(1, math.ceil(self.percentile / 100.0 * values.shape[1])))
            top = values.kthvalue(k, dim=1).values
            self._sum = top if self._sum is None else self._sum + top
        self.batches += 1

    def clip(self) -> torch.Tensor:
        if not self.batches:
            raise RuntimeError("the observer saw no calibration batch")
        if self._max is not None:
            return self._max
        assert self._sum is not None
        return self._sum / self.batches


def _groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, state, length) -> (groups, batch * state / groups * length)."""
    batch, state, length = x.shape
    return x.reshape(batch, groups, state // groups, length).transpose(0, 1).reshape(groups, -1)


# ---------------------------------------------------------------- quantized layers


class QuantWeight(nn.Module):
    """Base of the quantized layers: int8 ``qweight`` and fp32 ``weight_scale`` (per output
    channel) persistent; ``weight``, their dequantized float copy, non-persistent and
    recomputed whenever a state dict is loaded."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, per_tensor: bool = False
    ) -> None:
        super().__init__()
        codes, scale = quantize_weight(weight, per_tensor)
        self.register_buffer("qweight", codes)
        self.register_buffer("weight_scale", scale.to(weight.device))
        self.register_buffer("weight", torch.empty_like(weight, dtype=torch.float32), False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), False)
        self._dequantize()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._dequantize())

    @torch.no_grad()
    def _dequantize(self) -> None:
        shape = (-1,) + (1,) * (self.qweight.dim() - 1)
        self.weight.copy_(self.qweight.float() * self.weight_scale.view(shape))


class QuantLinear(QuantWeight):
    """``nn.Linear`` with int8 weights; ``act``: its input rounded to int8 with a static
    per-tensor scale (``input_scale``); ``rotation``: a Hadamard block size, the input
    rotated first and the rotation fused into the stored weight.

    ``per_tensor`` (Quamba's ``W8A8B16O16Linear``): one weight scale, the input codes in
    [-128, 127] and the product computed on the integer codes, then scaled; ``output``
    (its ``W8A8B8O8Linear``): the output rounded to int8 too, with ``output_scale``, as
    round(acc * (s_in / s_out) * s_w)."""

    def __init__(
        self,
        linear: nn.Linear,
        *,
        act: bool,
        rotation: int = 1,
        per_tensor: bool = False,
        output: bool = False,
    ) -> None:
        weight = linear.weight.detach().float()
        rotated = rotate(weight, rotation) if rotation > 1 else weight
        super().__init__(rotated, linear.bias, per_tensor)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rotation, self.per_tensor = rotation, per_tensor
        one = torch.ones((), device=weight.device)
        self.register_buffer("input_scale", one.clone() if act else None)
        self.register_buffer("output_scale", one.clone() if output else None)

    def extra_repr(self) -> str:
        act = "int8" if self.input_scale is not None else "float"
        out = "int8" if self.output_scale is not None else "float"
        weight = "per tensor" if self.per_tensor else "per channel"
        return (
            f"{self.in_features}, {self.out_features}, weight {weight}, input={act}, "
            f"output={out}, rotation={self.rotation}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation > 1:
            x = rotate(x, self.rotation)
        if self.per_tensor and self.input_scale is not None:
            return self._integer_forward(x)
        if self.input_scale is not None:
            x = fake_quantize(x, self.input_scale)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias)

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quamba's int8 GEMM: integer codes multiplied (exact in float32 up to ~1000
        inputs), one float scaling, the output rounded to int8 when ``output_scale``."""
        s_in, s_w = self.input_scale, self.weight_scale[0]
        codes = torch.clamp(torch.round(x.float() / s_in), -QMAX - 1, QMAX)
        acc = codes @ self.qweight.float().T
        bias = None if self.bias is None else self.bias.float()
        if self.output_scale is None:
            y = acc * (s_in * s_w)
            return (y if bias is None else y + bias).to(x.dtype)
        s_out = self.output_scale
        a = (s_in.double() / s_out.double()).float()  # Quamba: float(s_in / s_out) in fp64
        y = acc * a * s_w if bias is None else acc * a * s_w + bias / s_out
        return (torch.clamp(torch.round(y), -QMAX - 1, QMAX) * s_out).to(x.dtype)


class QuantConv(QuantWeight):
    """``nn.Conv1d`` / ``nn.Conv2d`` (zero padding) with int8 weights, float input."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__(conv.weight.detach().float(), conv.bias)
        self.conv = F.conv1d if isinstance(conv, nn.Conv1d) else F.conv2d
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self.conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class QuantScanInputs(nn.Module):
    """The selective scan's operands rounded to int8: u and delta per tensor, B and C with
    one scale per group of ``state / groups`` state channels (scales shaped (groups,)).
    ``u_only``: delta, B and C pass as they are (Quamba: they arrive as the int8 outputs
    of ``dt_proj`` and ``x_proj``)."""

    def __init__(
        self, groups: int, device: torch.device | None = None, u_only: bool = False
    ) -> None:
        super().__init__()
        self.groups, self.u_only = groups, u_only
        for name, shape in (("u", ()), ("delta", ()), ("b", (groups,)), ("c", (groups,))):
            scale = None if u_only and name != "u" else torch.ones(shape, device=device)
            self.register_buffer(f"{name}_scale", scale)

    def extra_repr(self) -> str:
        return "u only" if self.u_only else f"groups={self.groups}"

    def _grouped(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        per_state = scale.repeat_interleave(x.shape[1] // self.groups)
        return fake_quantize(x, per_state[None, :, None].to(x.dtype))

    def forward(
        self, u: torch.Tensor, delta: torch.Tensor, B: torch.Tensor, C: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.u_only:
            return fake_quantize(u, self.u_scale), delta, B, C
        return (
            fake_quantize(u, self.u_scale),
            fake_quantize(delta, self.delta_scale),
            self._grouped(B, self.b_scale),
            self._grouped(C, self.c_scale),
        )


# ---------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class Site:
    """One module the recipe replaces, and how."""

    name: str
    kind: str  # linear | conv | scan
    act: bool = False  # linear: int8 input
    rotation: int = 1  # linear: Hadamard block size of the input (1: none)
    percentile: float = 100.0  # linear input / scan operands: clipping percentile
    groups: int = 1  # scan: state groups of B and C
    per_tensor: bool = False  # linear: one weight scale, integer product (Quamba)
    output: bool = False  # linear: int8 output too (Quamba's B8O8 layers)
    smoothing: float = 0.0  # percentile observer's EMA factor (Quamba's), 0: an average
    input_from: str = ""  # linear: take the input scale of this site's output (Quamba)
    u_only: bool = False  # scan: quantize u only (Quamba)


@dataclass
class Plan:
    """The sites of one recipe on one model, and their observers while calibrating."""

    sites: list[Site]
    observers: dict[str, list[RangeObserver]] = field(default_factory=dict)

    @property
    def needs_calibration(self) -> bool:
        """Whether the recipe quantizes activations (static scales from calibration)."""
        return any(s.act or s.kind == "scan" for s in self.sites)


def mamba_mixers(model: nn.Module) -> list[str]:
    """Names of the modules that own a ``ScanInputs`` (the Mamba mixers)."""
    owners = {
        name.rpartition(".")[0] for name, m in model.named_modules() if isinstance(m, ScanInputs)
    }
    return sorted(owners)


def calibrates(recipe: str) -> bool:
    """Whether ``recipe`` quantizes activations, from calibration (all but weight-only int8)."""
    return recipe != "int8"


def plan(model: nn.Module, recipe: str, percentile: float = 99.99, bc_groups: int = 4) -> Plan:
    """The sites of ``recipe`` (one of ``RECIPES``) on ``model``; see the module doc."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {list(RECIPES)}, got {recipe!r}")
    if recipe in MAMBA_RECIPES and not mamba_mixers(model):
        raise ValueError(f"{recipe} needs a Mamba backbone: the model has no Mamba mixer")
    if recipe == "quamba":
        return _quamba_plan(model)
    act = calibrates(recipe)
    ssm = recipe in ("w8a8_ssm", "quamba2")
    prefix = [f"{m}." if m else "" for m in mamba_mixers(model)] if ssm else []
    rotated = {p + c for p in prefix for c in ("in_proj", "out_proj")}
    ssm_inputs = {p + c for p in prefix for c in ("x_proj", "x_proj_b")}
    sites = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            rotation = hadamard_block(module.in_features) if name in rotated else 1
            clip = percentile if name in ssm_inputs else 100.0
            sites.append(Site(name, "linear", act, rotation, clip))
        elif type(module) in (nn.Conv1d, nn.Conv2d) and module.padding_mode == "zeros":
            sites.append(Site(name, "conv"))
        elif ssm and isinstance(module, ScanInputs):
            sites.append(Site(name, "scan", percentile=percentile, groups=bc_groups))
    return Plan(sites)


def _quamba_plan(model: nn.Module) -> Plan:
    """Quamba's W8A8 (Mamba1) sites: see the module doc."""
    prefix = [f"{m}." if m else "" for m in mamba_mixers(model)]
    mixer = {p + c: c for p in prefix for c in _MIXER_LINEARS}
    sites = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            role = mixer.get(name, "")
            n = module.in_features
            rotation = (n if full_hadamard(n) else hadamard_block(n)) if role == "out_proj" else 1
            ssm_input = role.startswith("x_proj")
            sites.append(
                Site(
                    name,
                    "linear",
                    act=True,
                    rotation=rotation,
                    percentile=QUAMBA_PERCENTILE if ssm_input else 100.0,
                    smoothing=QUAMBA_SMOOTHING if ssm_input else 0.0,
                    per_tensor=True,
                    output=role in ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b"),
                    input_from=name.replace("dt_proj", "x_proj") if role.startswith("dt") else "",
                )
            )
        elif type(module) in (nn.Conv1d, nn.Conv2d) and module.padding_mode == "zeros":
            sites.append(Site(name, "conv"))
        elif isinstance(module, ScanInputs):
            scan = Site(name, "scan", percentile=QUAMBA_PERCENTILE, smoothing=QUAMBA_SMOOTHING)
            sites.append(dataclasses.replace(scan, u_only=True))
    return Plan(sites)


_MIXER_LINEARS = ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj")


@torch.no_grad()
def calibrate(model: nn.Module, quant_plan: Plan, batches: Iterable[torch.Tensor]) -> None:
    """Run ``batches`` through the float ``model`` (eval mode) and fill the plan's observers
    with the ranges of every activation the recipe quantizes."""
    handles = []

    def observe_input(site: Site, observers: list[RangeObserver]) -> object:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = rotate(args[0], site.rotation) if site.rotation > 1 else args[0]
            observers[0].update(x.reshape(1, -1))

        return hook

    def observe_output(observers: list[RangeObserver]) -> object:
        def hook(_module: nn.Module, _args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            observers[1].update(out.reshape(1, -1))

        return hook

    def observe_scan(site: Site, observers: list[RangeObserver]) -> object:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            u, delta, B, C = args
            if site.u_only:
                observers[0].update(u.reshape(1, -1))
                return
            if B.shape[1] % site.groups:
                raise ValueError(
                    f"bc_groups={site.groups} does not divide the {B.shape[1]} states of "
                    f"{site.name}"
                )
            observers[0].update(u.reshape(1, -1))
            observers[1].update(delta.reshape(1, -1))
            observers[2].update(_groups(B, site.groups))
            observers[3].update(_groups(C, site.groups))

        return hook

    modules = dict(model.named_modules())
    for site in quant_plan.sites:
        if site.kind == "linear" and site.act:
            observers = [RangeObserver(site.percentile, site.smoothing), RangeObserver()]
            handles.append(
                modules[site.name].register_forward_pre_hook(observe_input(site, observers))
            )
            if site.output:
                handles.append(modules[site.name].register_forward_hook(observe_output(observers)))
        elif site.kind == "scan":
            observers = [RangeObserver(site.percentile, site.smoothing) for _ in range(4)]
            handles.append(
                modules[site.name].register_forward_pre_hook(observe_scan(site, observers))
            )
        else:
            continue
        quant_plan.observers[site.name] = observers
    model.eval()
    try:
        for xb in batches:
            model(xb)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def convert(model: nn.Module, quant_plan: Plan) -> nn.Module:
    """Replace every site of the plan by its quantized layer, in place; scales from the
    observers (or placeholders of 1 when the plan was not calibrated: a state dict of the
    quantized model is to be loaded into it)."""
    modules = dict(model.named_modules())
    for site in quant_plan.sites:
        module = modules[site.name]
        observers = quant_plan.observers.get(site.name)
        if site.kind == "linear":
            new: nn.Module = QuantLinear(
                module,
                act=site.act,
                rotation=site.rotation,
                per_tensor=site.per_tensor,
                output=site.output,
            )
            if site.act and observers:
                source = quant_plan.observers.get(site.input_from)
                clip = source[1].clip() if source else observers[0].clip()
                new.input_scale.copy_(scale_of(clip[0]))
            if site.output and observers:
                new.output_scale.copy_(scale_of(observers[1].clip()[0]))
        elif site.kind == "conv":
            new = QuantConv(module)
        else:
            new = QuantScanInputs(site.groups, device=_device_of(model), u_only=site.u_only)
            if observers:
                used = observers[:1] if site.u_only else observers
                for name, observer in zip(("u", "delta", "b", "c"), used, strict=False):
                    clip = observer.clip()  # (groups,) for B and C, (1,) for u and delta
                    grouped = name in ("b", "c")
                    getattr(new, f"{name}_scale").copy_(scale_of(clip if grouped else clip[0]))
        parent, _, child = site.name.rpartition(".")
        setattr(modules[parent] if parent else model, child, new)
    return model


def quantize_model(
    model: nn.Module,
    recipe: str,
    calibration: Sequence[torch.Tensor] | None,
    *,
    percentile: float = 99.99,
    bc_groups: int = 4,
) -> nn.Module:
    """``model`` quantized in place by ``recipe``: planned, calibrated on the input batches
    ``calibration`` when the recipe quantizes activations, converted.

    ``calibration`` None builds the quantized structure only (scales of 1), to load an
    exported state dict of the same recipe into.
    """
    quant_plan = plan(model, recipe, percentile, bc_groups)
    if quant_plan.needs_calibration and calibration is not None:
        if not calibration:
            raise ValueError(f"{recipe} quantizes activations: it needs calibration batches")
        calibrate(model, quant_plan, calibration)
    convert(model, quant_plan)
    log.info("%s: %d layers quantized", recipe, len(quant_plan.sites))
    return model


def simulation_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The dequantized float weights that simulation computes with (not stored)."""
    return [m.weight for m in model.modules() if isinstance(m, QuantWeight)]


def _device_of(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")
