"""Zero-shot classification with a contrastive vision-language model (CLIP, SigLIP).

Each class becomes a text embedding: its name written into every template of the
dataset's set (``prompts``), encoded, L2-normalised and averaged (CLIP, Radford et
al. 2021, https://arxiv.org/abs/2103.00020; SigLIP, Zhai et al. 2023,
https://arxiv.org/abs/2303.15343). The text side is computed once per trial; images
are encoded in batches and classified by the largest cosine similarity. A learned
logit scale (and SigLIP's bias) is monotone, so it does not change the ranking and
is left out.

Model ids (``backbone:`` of the grid entry), loaded with open_clip:

- ``ARCH/TAG``: a built-in architecture and pretrained tag, e.g.
  ``ViT-B-32/laion2b_s34b_b79k`` (OpenCLIP) or ``ViT-B-16-SigLIP/webli`` (SigLIP);
- ``hf-hub:ORG/NAME``: a hub repo with an ``open_clip_config.json``;
- a local folder (``local-dir:PATH`` or a path starting with ``/ ./ ../ ~``) with
  ``open_clip_config.json`` and the weights beside it: the offline route.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import torch

from workers.baselines import prompts
from workers.baselines.base import (
    BASELINES,
    LOCAL_PREFIX,
    BaselineContext,
    BaselineResult,
    Stopwatch,
    class_names,
    fit_to_budget,
    load_error,
    local_dir,
    parameter_bytes,
    require_cached,
    require_files,
    topk_correct,
)
from workers.cost import call_macs
from workers.data import ImageData, batches

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
HUB_PREFIX = "hf-hub:"
# open_clip's default weight file names on the hub (safetensors preferred)
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class ZeroShotConfig:
    """Arguments of ``zeroshot``."""

    # template set: auto = the dataset's own (cifar100, dtd, digits; else default),
    # or one of prompts.NAMED (default = open_clip's 7 ImageNet templates, imagenet = 80)
    templates: str = "auto"
    classes_per_batch: int = 32  # class names encoded together (x templates texts a forward)

    def __post_init__(self) -> None:
        if self.templates != "auto" and self.templates not in prompts.NAMED:
            raise ValueError(
                f"templates must be 'auto' or one of {list(prompts.NAMED)}, got {self.templates!r}"
            )
        if self.classes_per_batch < 1:
            raise ValueError(f"classes_per_batch must be >= 1, got {self.classes_per_batch}")


def check_model(model_id: str) -> None:
    """A local folder must hold an open_clip config; ``ARCH/TAG`` must be known to
    open_clip; offline, the weights of a hub id or tag must be in the cache."""
    folder = local_dir(model_id)
    if folder is not None:
        require_files(folder, (CONFIG_FILE,), "open_clip")
        return
    if model_id.startswith(HUB_PREFIX):
        require_cached(model_id[len(HUB_PREFIX) :], CONFIG_FILE)
        return
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    arch, _, tag = model_id.partition("/")
    if arch not in open_clip.list_models():
        raise ValueError(
            f"open_clip has no architecture {arch!r} (see open_clip.list_models()); "
            "use ARCH/TAG, hf-hub:ORG/NAME or a local folder"
        )
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {arch}; tags: {tags}")
    hub = get_pretrained_cfg(arch, tag).get("hf_hub", "")
    if hub:
        repo, filename = posixpath.split(hub)  # "org/name/" or "org/name/file" (open_clip's form)
        require_cached(repo, *((filename,) if filename else HUB_WEIGHTS))
    tokenizer_repo = open_clip.get_model_config(arch)["text_cfg"].get("hf_tokenizer_name", "")
    if tokenizer_repo:
        require_cached(tokenizer_repo, "tokenizer_config.json", "tokenizer.json")


def load(model_id: str, device: torch.device) -> tuple[Any, Any, dict[str, Any]]:
    """The open_clip model (eval mode, on ``device``), its tokenizer and its image
    preprocessing config (size, mean, std)."""
    import open_clip

    folder = local_dir(model_id)
    if folder is not None:
        name, tag = f"{LOCAL_PREFIX}{folder}", None
    elif model_id.startswith(HUB_PREFIX):
        name, tag = model_id, None
    else:
        name, _, tag = model_id.partition("/")
    try:
        model = open_clip.create_model(name, pretrained=tag, device=device, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, RuntimeError, ValueError) as exc:
        raise load_error(model_id, exc) from exc
    return model.eval(), tokenizer, open_clip.get_model_preprocess_cfg(model)


@torch.no_grad()
def class_embeddings(
    model: Any,
    tokenizer: Any,
    classes: tuple[str, ...],
    templates: tuple[prompts.Template, ...],
    per_batch: int,
    device: torch.device,
) -> torch.Tensor:
    """(classes, dim) unit text embeddings: the mean over templates of each class's
    normalised embeddings, normalised again."""
    out = []
    for start in range(0, len(classes), per_batch):
        names = classes[start : start + per_batch]
        texts = [t(c) for c in names for t in templates]
        emb = model.encode_text(tokenizer(texts).to(device), normalize=True).float()
        emb = emb.view(len(names), len(templates), -1).mean(dim=1)
        out.append(torch.nn.functional.normalize(emb, dim=-1))
    return torch.cat(out)


@torch.no_grad()
def image_embeddings(
    model: Any, x: torch.Tensor, pre: dict[str, Any], ctx: BaselineContext
) -> torch.Tensor:
    """(n, dim) unit image embeddings of uint8 images ``x``, encoded in batches.

    Images are resized bilinearly on the device (open_clip's own transform resizes
    with PIL, bicubic) and normalised with the checkpoint's mean and std."""
    size = _square(pre["size"])
    labels = torch.zeros(len(x), dtype=torch.long, device=x.device)
    mean, std = tuple(pre["mean"]), tuple(pre["std"])
    out = []
    for xb, _ in batches(
        x, labels, ctx.batch_size, size=size, mean=mean, std=std, device=ctx.device
    ):
        with ctx.autocast:
            out.append(model.encode_image(xb, normalize=True).float())
    return torch.cat(out)


def _square(size: int | tuple[int, ...] | list[int]) -> int:
    if isinstance(size, int):
        return size
    if len(set(size)) != 1:
        raise ValueError(f"non-square input size {size} is not supported")
    return int(size[0])


def _accuracy(
    model: Any,
    weights: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    pre: dict[str, Any],
    ctx: BaselineContext,
) -> tuple[float, float]:
    scores = image_embeddings(model, x, pre, ctx) @ weights.T
    top1, top5 = topk_correct(scores, y.to(scores.device))
    return top1 / len(y), top5 / len(y)


@BASELINES.register(config_cls=ZeroShotConfig, check_model=check_model)
def zeroshot(
    config: ZeroShotConfig, model_id: str, data: ImageData, ctx: BaselineContext
) -> BaselineResult:
    """Zero-shot CLIP/SigLIP (open_clip): class-name prompt ensembles vs image embeddings."""
    model, tokenizer, pre = load(model_id, ctx.device)
    classes = class_names(data)
    chosen = ctx.dataset if config.templates == "auto" else config.templates
    templates = prompts.templates(chosen)
    normalise = (_square(pre["size"]), tuple(pre["mean"]), tuple(pre["std"]))
    ctx = fit_to_budget(ctx, model.encode_image, data.test_x, normalise, parameter_bytes(model))
    clock = Stopwatch(ctx)
    fit: list[float] = []
    evaluate: list[float] = []
    with clock.time(fit), ctx.autocast:
        weights = class_embeddings(
            model, tokenizer, classes, templates, config.classes_per_batch, ctx.device
        )
    with clock.time(evaluate):
        accuracy, top5 = _accuracy(model, weights, data.test_x, data.test_y, pre, ctx)
        val = None
        if data.val_x is not None:
            val = _accuracy(model, weights, data.val_x, data.val_y, pre, ctx)[0]
    energy = clock.energy()
    size = _square(pre["size"])
    probe = torch.zeros(1, 3, size, size, device=ctx.device)
    embedded = len(data.test_y) * weights.shape[1] * 4  # the test embeddings, float32
    return BaselineResult(
        accuracy=accuracy,
        top5_accuracy=top5,
        val_accuracy=val,
        params_total=sum(p.numel() for p in model.parameters()),
        macs=call_macs(lambda: model.encode_image(probe)),
        train_time_s=fit[0],
        eval_time_s=evaluate[0],
        params_bytes=parameter_bytes(model),
        batch_bytes=min(ctx.batch_size, len(data.test_y)) * 3 * size * size * 4,
        work_bytes=weights.numel() * weights.element_size() + embedded,
        energy=energy,
        batch_size_used=ctx.batch_size,
    )
