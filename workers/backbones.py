"""Backbone registry: pretrained vision models and their tiny CPU test variants.

Each variant is a short function that fixes the architecture and delegates to one
builder. Real variants load pretrained weights the ordinary way (timm hub id, or a
local ``.pth``/``.safetensors`` file given as ``pretrained:`` in the grid, always
with ``weights_only`` loading); tiny variants (``*_test``) share the same code with
small dimensions so that every method x checkpointing combination runs on a CPU.
The Mamba backbones (Vim, MambaVision) are our own code (``workers.mamba``), with the
official parameter names, so that their released weights load.

Example:
    >>> model = create_backbone("vit_test", num_classes=10)
    >>> input_size(model)
    32
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from workers.registry import Entry, Registry, RegistryError
from workers.structure import Structure, remember_blocks

log = logging.getLogger(__name__)

# Backbone families (each backbone is registered with exactly one as its tag); a
# method declares the families it applies to.
TRANSFORMER = "transformer"  # blocks of attention + MLP linear layers over a token grid
INVERTED_RESIDUAL = "inverted_residual"  # MobileNet-style depthwise/pointwise conv blocks
MAMBA = "mamba"  # selective state-space blocks
FAMILIES = (TRANSFORMER, INVERTED_RESIDUAL, MAMBA)

# What released checkpoints pickle beside their tensors that weights_only loading may
# rebuild: the training arguments, an argparse Namespace of plain values (the DeiT-style
# script of hustvl/Vim saves one as "args").
SAFE_CHECKPOINT_GLOBALS = (argparse.Namespace,)
# Prefixes that a wrapper around the whole model puts on every key: DistributedDataParallel's
# "module.", and the "model." of Hugging Face remote-code wrappers (nvidia/MambaVision-*).
WRAPPER_PREFIXES = ("module.", "model.")


@dataclass(frozen=True)
class BackboneConfig:
    """Arguments every backbone accepts in a grid (``backbones: {name: {...}}``)."""

    # fields added after records existed: left out of a trial's id at their default
    LATER_FIELDS: ClassVar[tuple[str, ...]] = ("model_args",)

    # None: random init; "hub": the timm hub weights of this variant; anything else:
    # a timm hub id ("hf-hub:org/name") or a local .pth/.bin/.safetensors file.
    pretrained: str | None = None
    img_size: int = 0  # input resolution; 0 = the variant's native resolution
    drop_path_rate: float = 0.0  # stochastic depth
    # passed to the architecture's constructor (timm.create_model keyword arguments)
    model_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.img_size < 0 or (self.img_size and not 8 <= self.img_size <= MAX_IMG_SIZE):
            raise ValueError(
                f"img_size must be 0 (native) or in [8, {MAX_IMG_SIZE}], got {self.img_size}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        reserved = sorted(set(self.model_args) & {"num_classes", "pretrained", "img_size"})
        if reserved:
            raise ValueError(
                f"model_args may not set {reserved}: the dataset sets num_classes, "
                "and pretrained / img_size are backbone arguments of their own"
            )


# ---------------------------------------------------------------- any timm model

HF_HUB = "hf-hub:"
# The largest input resolution a grid may ask for (a larger one is a typo whose first
# activation alone would take the node's memory down).
MAX_IMG_SIZE = 4096


@functools.lru_cache(maxsize=1)
def timm_names() -> frozenset[str]:
    """Every architecture name timm can build (``timm.list_models()``)."""
    import timm

    return frozenset(timm.list_models())


def _any_timm(name: str) -> Entry | None:
    """The entry of a timm model that is not registered here (a name or an hf-hub id)."""
    if not (name.startswith(HF_HUB) or name in timm_names()):
        return None
    builder = partial(_timm_model, name)
    return Entry(name, builder, BackboneConfig, f"timm model {name}")


def _timm_model(variant: str, config: BackboneConfig, num_classes: int) -> nn.Module:
    """Any timm model: ``img_size`` where the architecture takes it (the others run at
    any resolution as they are), ``drop_path_rate`` where it has stochastic depth."""
    import timm

    native = (
        int(timm.get_pretrained_cfg(variant, allow_unregistered=True).input_size[-1])
        if (not variant.startswith(HF_HUB))
        else 0
    )
    takes_img_size = bool(config.img_size) and _accepts(variant, "img_size")
    return _timm_backbone(variant, config, num_classes, native, takes_img_size=takes_img_size)


@functools.lru_cache(maxsize=256)
def _accepts(variant: str, argument: str) -> bool:
    """Whether the timm architecture ``variant`` takes keyword ``argument`` (built on the
    meta device with it: no memory, no download)."""
    import timm

    try:
        with torch.device("meta"):
            timm.create_model(variant, pretrained=False, **{argument: _PROBE[argument]})
    except TypeError as exc:
        if argument in str(exc):
            return False
        raise
    return True


_PROBE = {"img_size": 224, "drop_path_rate": 0.1}


BACKBONES = Registry("backbone", fallback=_any_timm, candidates=lambda: sorted(timm_names()))


def family(name: str, args: dict[str, Any] | None = None) -> str:
    """The family of backbone ``name``: its registered tag, else the first of those its
    structure shows (``workers.structure``), else ``"other"``."""
    tags = BACKBONES.get(name).tags & set(FAMILIES)
    if len(tags) == 1:
        return next(iter(tags))
    found = check_backbone(name, args).families
    return next((f for f in FAMILIES if f in found), "other")


def create_backbone(
    name: str, num_classes: int, pretrained: str | None = None, **kwargs: Any
) -> nn.Module:
    """Build backbone ``name`` with a fresh ``num_classes`` head.

    ``kwargs`` are the grid's backbone arguments (see ``BackboneConfig``).
    """
    args = dict(kwargs, pretrained=pretrained) if pretrained is not None else dict(kwargs)
    model = BACKBONES.build(name, args, num_classes=num_classes)
    remember_blocks(model)
    return model


def input_size(model: nn.Module) -> int:
    """Square input resolution the model expects (timm's ``pretrained_cfg['input_size']``)."""
    return int(model.pretrained_cfg["input_size"][-1])


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the classification head (trained by every PEFT method)."""
    return str(model.pretrained_cfg["classifier"])


# ---------------------------------------------------------------- builders


def _timm_backbone(
    variant: str,
    config: BackboneConfig,
    num_classes: int,
    native_size: int,
    takes_img_size: bool = True,
    model_cls: type[nn.Module] | None = None,
    **model_args: Any,
) -> nn.Module:
    """One timm model, resized input, optional pretrained weights, fresh head.

    ``takes_img_size``: the architecture is built for one resolution (ViT position
    embeddings); otherwise it accepts any resolution as it is (TinyViT, MobileNets).
    ``model_cls``: build this timm model class from ``model_args`` with ``variant``'s
    pretrained config, for an architecture timm does not register (a tiny test
    variant); None builds the registered ``variant``.
    """
    import timm
    from timm.models import build_model_with_cfg

    size = config.img_size or native_size
    model_args = {**model_args, **config.model_args}
    if takes_img_size:
        model_args["img_size"] = size
    if config.drop_path_rate:  # not every architecture has stochastic depth
        model_args["drop_path_rate"] = config.drop_path_rate
    hub = config.pretrained if _is_hub_ref(config.pretrained) else None
    factory = timm.create_model if model_cls is None else partial(build_model_with_cfg, model_cls)
    try:
        model = factory(
            hub if hub and hub.startswith("hf-hub:") else variant,
            pretrained=hub is not None,
            num_classes=num_classes,
            **model_args,
        )
    except (OSError, RuntimeError) as exc:
        if hub is None:
            raise
        raise RuntimeError(
            f"backbone {variant!r}: could not download pretrained weights {hub!r} ({exc}); "
            "when offline, give a local file as `pretrained: /path/to/weights.safetensors`"
        ) from exc
    if config.pretrained and hub is None:
        load_pretrained_file(model, Path(config.pretrained))
    size = size or int(model.pretrained_cfg["input_size"][-1])
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, size, size))
    return model


def _is_hub_ref(ref: str | None) -> bool:
    return bool(ref) and (ref == "hub" or ref.startswith("hf-hub:") or ref.startswith("timm/"))


def load_pretrained_file(model: nn.Module, path: Path) -> None:
    """Load a local checkpoint into ``model`` (strict, except a head of another size).

    ``weights_only`` loading: a checkpoint that needs pickled objects other than tensors
    and ``SAFE_CHECKPOINT_GLOBALS`` is refused. A training checkpoint's model entry is
    taken, and a wrapper's key prefix (``WRAPPER_PREFIXES``) removed.
    """
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_GLOBALS)):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # not a checkpoint, or one with unsafe objects
            raise pickle.UnpicklingError(
                f"{path}: refused by weights-only loading ({_first_line(exc)})"
            ) from None
        except (RuntimeError, EOFError, ValueError) as exc:
            raise RuntimeError(f"{path}: not a loadable checkpoint ({_first_line(exc)})") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    own = model.state_dict()
    state = _without_wrapper_prefix(state, own)
    head = classifier_name(model)
    dropped = [
        k
        for k, v in state.items()
        if k.startswith(head + ".") and k in own and own[k].shape != v.shape
    ]
    for key in dropped:  # the dataset's head replaces the pretraining head
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in dropped]
    if missing or unexpected:
        raise RuntimeError(
            f"{path}: checkpoint does not match the model; "
            f"missing keys {missing[:8]}, unexpected keys {unexpected[:8]}"
        )
    log.info("loaded %s (%d tensors, head re-initialised: %s)", path, len(state), bool(dropped))


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _without_wrapper_prefix(state: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the prefix that every one of its keys has and none of ``own``'s."""
    for prefix in WRAPPER_PREFIXES:
        if (
            state
            and all(k.startswith(prefix) for k in state)
            and not any(k.startswith(prefix) for k in own)
        ):
            return {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _mamba_backbone(
    model_cls: Callable[..., nn.Module],
    config: BackboneConfig,
    num_classes: int,
    native_size: int,
    hub: tuple[str, str] | None = None,
    **model_args: Any,
) -> nn.Module:
    """One of our Mamba models at the config's resolution, optional weights, fresh head.

    ``hub``: (repository, file) of the variant's released weights, for ``pretrained: hub``;
    ``hf-hub:org/name[/file]`` names another repository (``workers.mamba.hub.resolve``).
    """
    from workers.mamba import hub as mamba_hub

    size = config.img_size or native_size
    model = model_cls(
        img_size=size,
        num_classes=num_classes,
        drop_path_rate=config.drop_path_rate,
        **{**model_args, **config.model_args},
    )
    released = mamba_hub.HubWeights(*hub) if hub else None
    if released:
        model.pretrained_cfg.update(hf_hub_id=released.repo, hf_hub_filename=released.filename)
    if config.pretrained:
        ref = config.pretrained
        is_hub = ref == "hub" or ref.startswith(mamba_hub.HUB_PREFIX)
        path = mamba_hub.download(mamba_hub.resolve(ref, released)) if is_hub else Path(ref)
        load_pretrained_file(model, path)
    return model


# ---------------------------------------------------------------- validation

CHECK_CLASSES = 10  # head size of the models built to validate a grid (any works)


def check_backbone(name: str, args: dict[str, Any] | None = None) -> Structure:
    """Build backbone ``name`` on the meta device (no memory, no download) and run one
    forward at its input size there; its ``Structure``. Raises ``RegistryError`` with
    the reason (an unknown name or argument, an input size it cannot take)."""
    return _checked(name, json.dumps(args or {}, sort_keys=True))


def meta_backbone(name: str, args: dict[str, Any] | None, num_classes: int) -> nn.Module:
    """Backbone ``name`` built on the meta device: shapes without memory, no weights
    loaded or downloaded."""
    config = BACKBONES.make_config(name, {**(args or {}), "pretrained": None})
    with torch.device("meta"):
        return BACKBONES.get(name).builder(config, num_classes=num_classes)


@functools.lru_cache(maxsize=64)
def _checked(name: str, args_json: str) -> Structure:
    from workers.structure import describe

    args = json.loads(args_json)
    pretrained = args.get("pretrained")
    if pretrained and not _is_hub_ref(pretrained) and not Path(pretrained).expanduser().is_file():
        raise RegistryError(f"backbone {name!r}: pretrained weights not found: {pretrained}")
    try:
        model = meta_backbone(name, args, CHECK_CLASSES)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
        raise RegistryError(f"backbone {name!r} cannot be built with {args}: {exc}") from None
    size = input_size(model)
    try:
        with torch.device("meta"), torch.no_grad():
            out = model.eval()(torch.empty(1, 3, size, size))
    except NotImplementedError:  # an op without a meta kernel: the forward is not checked
        return describe(model)
    except Exception as exc:  # noqa: BLE001 - any failure is the grid's error to report
        if "meta" in str(exc):  # data-dependent code (.item()) cannot run without data
            log.info("backbone %s: forward not checked on the meta device (%s)", name, exc)
            return describe(model)
        raise RegistryError(
            f"backbone {name!r} does not run on {size} px inputs with {args}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if tuple(out.shape) != (1, CHECK_CLASSES):
        raise RegistryError(
            f"backbone {name!r} gives outputs of shape {tuple(out.shape)}, not (batch, classes)"
        )
    return describe(model)


# ---------------------------------------------------------------- variants


@BACKBONES.register(config_cls=BackboneConfig, tags=(TRANSFORMER,))
def vit_small_patch16_224(config: BackboneConfig, num_classes: int) -> nn.Module:
    """ViT-S/16 at 224 px (22M parameters), timm."""
    return _timm_backbone("vit_small_patch16_224", config, num_classes, 224)


@BACKBONES.register(config_cls=BackboneConfig, tags=(TRANSFORMER,))
def tiny_vit_5m_224(config: BackboneConfig, num_classes: int) -> nn.Module:
    """TinyViT-5M at 224 px, timm (windowed attention pads any size that is a multiple of 32)."""
    return _timm_backbone("tiny_vit_5m_224", config, num_classes, 224, takes_img_size=False)


@BACKBONES.register(config_cls=BackboneConfig, tags=(TRANSFORMER,))
def vit_test(config: BackboneConfig, num_classes: int) -> nn.Module:
    """Tiny ViT for CPU tests: 32 px, patch 8, dim 64, depth 4, 2 heads, class token (0.2M).

    Patch tokens are average-pooled (the class token is kept): from random init this
    learns digits in a few epochs, where token pooling needs several times more.
    """
    model_args = dict(patch_size=8, embed_dim=64, depth=4, num_heads=2, global_pool="avg")
    return _timm_backbone("vit_small_patch16_224", config, num_classes, 32, **model_args)


@BACKBONES.register(config_cls=BackboneConfig, tags=(TRANSFORMER,))
def tiny_vit_test(config: BackboneConfig, num_classes: int) -> nn.Module:
    """Tiny TinyViT for CPU tests: 32 px, dims 16-96, depths 1-1-2-1 (0.26M parameters)."""
    model_args = dict(
        embed_dims=(16, 32, 64, 96),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 2, 3),
        window_sizes=(2, 2, 2, 1),
    )
    return _timm_backbone(
        "tiny_vit_5m_224", config, num_classes, 32, takes_img_size=False, **model_args
    )


@BACKBONES.register(config_cls=BackboneConfig, tags=(INVERTED_RESIDUAL,))
def mobilenetv2_100(config: BackboneConfig, num_classes: int) -> nn.Module:
    """MobileNetV2 1.0 at 224 px (3.5M parameters), timm; any resolution runs as it is."""
    return _timm_backbone("mobilenetv2_100", config, num_classes, 224, takes_img_size=False)


@BACKBONES.register(config_cls=BackboneConfig, tags=(INVERTED_RESIDUAL,))
def mobilenetv3_large_100(config: BackboneConfig, num_classes: int) -> nn.Module:
    """MobileNetV3-Large 1.0 at 224 px (5.5M parameters), timm; any resolution runs as it is."""
    return _timm_backbone("mobilenetv3_large_100", config, num_classes, 224, takes_img_size=False)


@BACKBONES.register(config_cls=BackboneConfig, tags=(INVERTED_RESIDUAL,))
def mobilenetv2_test(config: BackboneConfig, num_classes: int) -> nn.Module:
    """Tiny MobileNetV2 for CPU tests: 32 px, widths 8-48, 8 blocks, 128 head features.

    timm's MobileNetV2 class and block strings (BatchNorm + ReLU6 inverted residuals,
    a depthwise-separable first block); timm fixes V2's head at 1280 features, too
    many for a tiny model, hence the class built from its arguments.
    """
    from timm.models import EfficientNet
    from timm.models._efficientnet_builder import decode_arch_def

    arch = [
        ["ds_r1_k3_s1_c8"],
        ["ir_r2_k3_s2_e6_c16"],
        ["ir_r2_k3_s2_e6_c24"],
        ["ir_r2_k3_s2_e6_c32"],
        ["ir_r1_k3_s1_e6_c48"],
    ]
    model_args = dict(
        block_args=decode_arch_def(arch), stem_size=8, num_features=128, act_layer=nn.ReLU6
    )
    return _timm_backbone(
        "mobilenetv2_100", config, num_classes, 32, False, EfficientNet, **model_args
    )


@BACKBONES.register(config_cls=BackboneConfig, tags=(INVERTED_RESIDUAL,))
def mobilenetv3_test(config: BackboneConfig, num_classes: int) -> nn.Module:
    """Tiny MobileNetV3 for CPU tests: 32 px, widths 8-40, 8 blocks, 128 head features.

    timm's MobileNetV3 class with V3-Large's block kinds: ReLU blocks, then hard-swish
    blocks, squeeze-excite (ReLU, hard-sigmoid gate) in some of both, a final 1x1
    ConvBnAct and a conv head, as timm's own generator builds them.
    """
    from timm.layers import get_act_layer
    from timm.models import MobileNetV3
    from timm.models._efficientnet_blocks import SqueezeExcite
    from timm.models._efficientnet_builder import decode_arch_def, round_channels

    arch = [
        ["ds_r1_k3_s1_e1_c8_nre"],  # relu
        ["ir_r2_k3_s2_e4_c16_nre"],  # relu
        ["ir_r1_k5_s2_e3_c24_se0.25_nre"],  # relu + squeeze-excite
        ["ir_r2_k3_s2_e4_c32"],  # hard-swish
        ["ir_r2_k3_s1_e6_c40_se0.25"],  # hard-swish + squeeze-excite
        ["cn_r1_k1_s1_c96"],  # hard-swish
    ]
    se_layer = partial(
        SqueezeExcite,
        gate_layer="hard_sigmoid",
        force_act_layer=nn.ReLU,
        rd_round_fn=round_channels,
    )
    model_args = dict(
        block_args=decode_arch_def(arch),
        stem_size=8,
        num_features=128,
        act_layer=get_act_layer("hard_swish"),
        se_layer=se_layer,
    )
    return _timm_backbone(
        "mobilenetv3_large_100", config, num_classes, 32, False, MobileNetV3, **model_args
    )


# The Mamba family: our own implementations (workers.mamba) with the official names.


@BACKBONES.register(config_cls=BackboneConfig, tags=(MAMBA,))
def vim_small(config: BackboneConfig, num_classes: int) -> nn.Module:
    """Vision Mamba Vim-S at 224 px (25.8M parameters): hustvl/Vim's
    ``vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``.

    ``pretrained: hub``: hustvl/Vim-small-midclstok (ImageNet-1k, 80.5% top-1; the
    repository's "ft" file is the stride-8 model, another architecture).
    """
    from workers.mamba.vim import VisionMamba

    hub = ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth")
    model_args = dict(patch_size=16, embed_dim=384, depth=24, d_state=16)
    return _mamba_backbone(VisionMamba, config, num_classes, 224, hub, **model_args)


@BACKBONES.register(config_cls=BackboneConfig, tags=(MAMBA,))
def mambavision_t(config: BackboneConfig, num_classes: int) -> nn.Module:
    """MambaVision-T at 224 px (31.8M parameters): NVlabs/MambaVision's ``mamba_vision_T``;
    any resolution runs as it is (windows are padded).

    ``pretrained: hub``: nvidia/MambaVision-T-1K (ImageNet-1k, 82.3% top-1), its
    safetensors file (keys under the wrapper's ``model.``). The repository's training
    checkpoint ``mambavision_tiny_1k.pth.tar`` loads as a local file as long as it
    pickles nothing but tensors and ``SAFE_CHECKPOINT_GLOBALS``.
    """
    from workers.mamba.mambavision import MambaVision

    hub = ("nvidia/MambaVision-T-1K", "model.safetensors")
    model_args = dict(
        dim=80, in_dim=32, depths=(1, 3, 8, 4), num_heads=(2, 4, 8, 16), window_size=(8, 8, 14, 7)
    )
    return _mamba_backbone(MambaVision, config, num_classes, 224, hub, **model_args)


@BACKBONES.register(config_cls=BackboneConfig, tags=(MAMBA,))
def vim_test(config: BackboneConfig, num_classes: int) -> nn.Module:
    """Tiny Vim for CPU tests: 32 px, patch 8 (16 tokens + class token), dim 32, depth 4."""
    from workers.mamba.vim import VisionMamba

    model_args = dict(patch_size=8, embed_dim=32, depth=4, d_state=16)
    return _mamba_backbone(VisionMamba, config, num_classes, 32, **model_args)


@BACKBONES.register(config_cls=BackboneConfig, tags=(MAMBA,))
def mambavision_test(config: BackboneConfig, num_classes: int) -> nn.Module:
    """Tiny MambaVision for CPU tests: 64 px, dims 16-128, depths 1-1-2-2 (each token level:
    a mixer block, then an attention block), one window per map (4x4 and 2x2 tokens).

    64 px, not 32: the model downsamples by 32, and a 1x1 map would leave the last level's
    scan a single step (where A has no effect). Smaller inputs run too (padded windows).
    """
    from workers.mamba.mambavision import MambaVision

    model_args = dict(
        dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 1, 2, 4), window_size=(8, 8, 4, 2)
    )
    return _mamba_backbone(MambaVision, config, num_classes, 64, **model_args)
