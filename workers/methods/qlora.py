"""QLoRA: LoRA adapters over a frozen base whose block linear layers are stored in 4 bits.

Dettmers, Pagnoni, Holtzman, Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized
LLMs", NeurIPS 2023. https://arxiv.org/abs/2305.14314

The base weights of the blocks' attention and MLP projections become bitsandbytes
``Linear4bit`` layers (NormalFloat-4, optional double quantization of the block
scales, matmuls in ``compute_dtype``); peft then puts LoRA adapters on exactly those
layers. The patch embedding, norms and the head stay in full precision (the head is
trained). bitsandbytes quantizes a weight when it is moved to a device, so this runs
on CPU as well as on CUDA, and ``model.to("cuda")`` later carries the 4-bit state.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from workers.methods.base import METHODS, Adapted, MethodContext
from workers.methods.lora import (
    BLOCK_LINEARS,
    check_adapter,
    effective_target,
    missing_targets,
)
from workers.methods.peft_import import import_peft
from workers.structure import Structure

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class QloraArgs:
    """Quantization defaults from the QLoRA paper (NF4, double quantization, bf16 compute).

    The paper's LoRA rank (64) is sized for 7B-65B language models; the default here is
    the same rank, alpha and target as ``lora`` (with the paper's dropout 0.1), so that a
    sweep's lora-vs-qlora difference is the quantization alone.
    """

    r: int = 8  # rank of the update
    alpha: float = 16.0  # scaling: the update is multiplied by alpha / r
    dropout: float = 0.1  # dropout on the adapter's input (paper: 0.1 up to 13B)
    quant_type: str = "nf4"  # 4-bit data type: nf4 (paper) or fp4
    double_quant: bool = True  # quantize the per-block scales as well (paper: on)
    compute_dtype: str = "bf16"  # dtype of the de-quantized matmul: fp32, bf16, fp16
    block_size: int = 64  # weights per quantization block (paper: 64)
    target: str = BLOCK_LINEARS  # regular expression over module names (full match)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        check_adapter(self.alpha, self.dropout, self.target)
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be nf4 or fp4, got {self.quant_type!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                f"got {self.compute_dtype!r}"
            )
        if self.block_size not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(
                f"block_size must be a power of two in [32, 4096], got {self.block_size}"
            )

    def missing(self, structure: Structure) -> str | None:
        return missing_targets(structure, self.target)


def quantize_linears(model: nn.Module, config: QloraArgs) -> list[str]:
    """Replace every ``nn.Linear`` whose name fully matches ``config.target`` by a frozen
    4-bit ``Linear4bit`` (quantized in place, on the weight's current device).

    Returns the names of the quantized layers.
    """
    import bitsandbytes as bnb

    pattern = re.compile(config.target)
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not pattern.fullmatch(name):
            continue
        if _block_size(module.in_features, config.block_size) is None:
            log.warning(
                "qlora: %s kept in full precision (in_features %d is not a multiple of 32)",
                name,
                module.in_features,
            )
            continue
        names.append(name)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear: nn.Linear = getattr(parent, child)
        device = linear.weight.device
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=COMPUTE_DTYPES[config.compute_dtype],
            compress_statistics=config.double_quant,
            quant_type=config.quant_type,
        )
        q.weight = bnb.nn.Params4bit(
            linear.weight.data.detach().to("cpu").clone(),
            requires_grad=False,
            blocksize=_block_size(linear.in_features, config.block_size),
            compress_statistics=config.double_quant,
            quant_type=config.quant_type,
        )
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weight for inference on the
        # first eval forward, after which the training path no longer works: keep the
        # one layout that serves both.
        q.support_avx512bf16_for_cpu = False
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.detach().clone(), requires_grad=False)
        setattr(parent, child, q.to(device))  # moving to a device quantizes the weight
    return names


def _block_size(in_features: int, wanted: int) -> int | None:
    """The largest power of two <= ``wanted`` (and >= 32) that divides a weight row.

    Quantization blocks that straddle two rows are measured to lose accuracy in the
    CPU kernels (relative weight error 0.23-0.26 instead of 0.09 for rows of 32 or 96
    weights with blocks of 64), so a block never crosses a row.
    """
    size = wanted
    while size >= 32:
        if in_features % size == 0:
            return size
        size //= 2
    return None


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The full-precision weight that a ``Linear4bit`` layer computes with."""
    import bitsandbytes as bnb

    weight = layer.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


@METHODS.register(config_cls=QloraArgs)
def qlora(config: QloraArgs, model: nn.Module, ctx: MethodContext) -> Adapted:
    """4-bit NF4 block linears (bitsandbytes) + LoRA on them (peft), head trained in full."""
    peft = import_peft()

    config = dataclasses.replace(config, target=effective_target(model, config.target))
    names = quantize_linears(model, config)
    if not names:
        raise ValueError(f"qlora: target {config.target!r} matches no linear layer of the model")
    log.info("qlora: %d linear layers quantized to %s", len(names), config.quant_type)
    # peft wraps Linear4bit layers with its 4-bit LoRA layer only when the model says so
    model.is_loaded_in_4bit = True
    peft_config = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target,
        modules_to_save=[ctx.classifier],
    )
    return Adapted(peft.get_peft_model(model, peft_config))
