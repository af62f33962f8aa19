"""Frozen self-supervised features (DINOv2) with a linear probe or a weighted k-NN.

The two light evaluation protocols of the DINO papers, on features of a frozen
backbone (DINOv2, Oquab et al. 2023, https://arxiv.org/abs/2304.07193; weighted
k-NN from DINO, Caron et al. 2021, https://arxiv.org/abs/2104.14294, section 4.1):

- ``dinov2_linear``: multinomial logistic regression on the features, fitted by
  full-batch L-BFGS on the trial's device, with the L2 strength chosen on the
  validation split (scikit-learn's objective and ``C``, so the two agree);
- ``dinov2_knn``: cosine similarity to every training feature, the ``k`` nearest
  vote for their class with weight ``exp(similarity / temperature)``.

Model ids (``backbone:`` of the grid entry), loaded with timm (pretrained, no head):
a timm name with its tag (``vit_small_patch14_dinov2.lvd142m``), a hub id
(``hf-hub:timm/vit_small_patch14_dinov2.lvd142m``), or a local folder in timm's hub
format (``config.json`` + ``model.safetensors``; ``local-dir:PATH`` or a path
starting with ``/ ./ ../ ~``), the offline route.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.baselines.base import (
    BASELINES,
    LOCAL_PREFIX,
    BaselineContext,
    BaselineResult,
    Stopwatch,
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
from workers.data.core import MAX_IMAGE_SIZE

log = logging.getLogger(__name__)

POOLS = ("cls", "cls_avg")
HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
KNN_CHUNK = 256  # query rows per similarity matrix (chunk x training images, float32)

Split = tuple[torch.Tensor, torch.Tensor]  # features, labels
Probe = tuple[torch.Tensor, torch.Tensor]  # weights (classes, dim), bias (classes,)
# a fitted classifier: features -> (n, classes) scores; validation accuracy; its parameters
Fitted = tuple[Callable[[torch.Tensor], torch.Tensor], float | None, int]


@dataclass(frozen=True)
class FeatureConfig:
    """How features are taken from the frozen backbone."""

    # input resolution; DINOv2's linear and k-NN evaluations use 224 (0 = the
    # checkpoint's native size, 518 for the released ViTs: 5x the tokens)
    image_size: int = 224
    # cls = the class token; cls_avg = class token and mean patch token concatenated
    # (DINOv2's linear evaluation)
    features: str = "cls"

    def __post_init__(self) -> None:
        if not 0 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be in [0, {MAX_IMAGE_SIZE}] (0 = native), got {self.image_size}"
            )
        if self.features not in POOLS:
            raise ValueError(f"features must be one of {list(POOLS)}, got {self.features!r}")


@dataclass(frozen=True)
class LinearProbeConfig(FeatureConfig):
    """Arguments of ``dinov2_linear``."""

    # inverse L2 strengths tried (scikit-learn's C: larger fits the training set closer);
    # the best on the validation split is kept
    c_values: tuple[float, ...] = (0.1, 1.0, 10.0)
    max_iter: int = 300  # L-BFGS iterations of one fit
    # without a validation split (dataset option val_fraction), this share of the
    # training images is held out to choose C, then the probe is refitted on all of them
    holdout: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.c_values or any(c <= 0 for c in self.c_values):
            raise ValueError(f"c_values must be numbers > 0, got {list(self.c_values)}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")


@dataclass(frozen=True)
class KnnConfig(FeatureConfig):
    """Arguments of ``dinov2_knn`` (defaults: DINO's k = 20, T = 0.07)."""

    k: int = 20  # neighbours that vote
    temperature: float = 0.07  # vote weight exp(cosine similarity / temperature)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


# ---------------------------------------------------------------- model


def check_model(model_id: str) -> None:
    """A local folder must be in timm's format; a timm name must be registered with
    that pretrained tag; offline, hub weights must be in the cache."""
    folder = local_dir(model_id)
    if folder is not None:
        require_files(folder, ("config.json",), "timm")
        require_files(folder, WEIGHT_FILES, "timm")
        return
    if model_id.startswith(HUB_PREFIX):
        require_cached(model_id[len(HUB_PREFIX) :], "config.json")
        return
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(model_id)
    if not timm.is_model(arch):
        raise ValueError(f"timm has no model {arch!r}; use NAME.TAG, hf-hub:ORG/NAME or a folder")
    try:
        cfg = get_pretrained_cfg(model_id)
    except RuntimeError:  # a tag the architecture does not have
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ValueError(
            f"timm has no pretrained weights {tag!r} for {arch}; "
            f"tags: {timm.list_pretrained(arch + '.*')}"
        )
    if cfg.hf_hub_id:
        require_cached(cfg.hf_hub_id, *WEIGHT_FILES)


def load(model_id: str, image_size: int) -> nn.Module:
    """The pretrained backbone without a head, in eval mode (on the CPU)."""
    import timm

    folder = local_dir(model_id)
    name = f"{LOCAL_PREFIX}{folder}" if folder is not None else model_id
    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size:
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        raise load_error(model_id, exc) from exc
    return model.eval()


@torch.no_grad()
def extract(
    model: nn.Module,
    x: torch.Tensor,
    pool: str,
    size: int,
    data_cfg: dict[str, Any],
    ctx: BaselineContext,
) -> torch.Tensor:
    """(n, dim) float32 features of uint8 images ``x`` at ``size`` px, normalised with the
    checkpoint's mean and std, on the trial's device."""
    labels = torch.zeros(len(x), dtype=torch.long, device=x.device)
    feed = batches(
        x,
        labels,
        ctx.batch_size,
        size=size,
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
        device=ctx.device,
    )
    out = []
    for xb, _ in feed:
        with ctx.autocast:
            tokens = model.forward_features(xb).float()
        cls = tokens[:, 0]
        if pool == "cls_avg":
            patches = tokens[:, getattr(model, "num_prefix_tokens", 1) :]
            cls = torch.cat([cls, patches.mean(dim=1)], dim=1)
        out.append(cls)
    return torch.cat(out)


# ---------------------------------------------------------------- linear probe


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float, max_iter: int
) -> Probe:
    """Multinomial logistic regression: weights (classes, dim) and bias (classes,)
    minimising scikit-learn's ``C * sum(cross-entropy) + |W|^2 / 2`` (bias not
    penalised), divided by ``C * n`` for a well-scaled L-BFGS (same minimiser)."""
    n, dim = x.shape
    # in float64: the minimum is flat, and float32 arithmetic stops L-BFGS up to 3e-4
    # away from the minimiser (which one depends on the CPU's kernels)
    dtype, x = x.dtype, x.double()
    weight = torch.zeros(num_classes, dim, device=x.device, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + weight.square().sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach().to(dtype), bias.detach().to(dtype)


def _split(y: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out) of a stratified random split; every class keeps one."""
    gen = torch.Generator().manual_seed(seed)
    kept, held = [], []
    labels = y.cpu()
    for cls in labels.unique():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = min(len(idx) - 1, round(len(idx) * share))
        held.append(idx[:k])
        kept.append(idx[k:])
    return torch.cat(kept).to(y.device), torch.cat(held).to(y.device)


def select_c(
    train: Split, val: Split, num_classes: int, config: LinearProbeConfig
) -> tuple[float, float, Probe]:
    """The C of ``config.c_values`` with the best validation accuracy (the first on a
    tie), that accuracy, and the probe fitted on ``train`` with it."""
    scored = []
    for c in config.c_values:
        probe = fit_logistic(*train, num_classes, c, config.max_iter)
        scored.append((c, _probe_accuracy(probe, *val), probe))
        log.info("linear probe: C=%g validation accuracy %.4f", c, scored[-1][1])
    return max(scored, key=lambda s: s[1])


def _probe_accuracy(probe: Probe, x: torch.Tensor, y: torch.Tensor) -> float:
    weight, bias = probe
    return float(((x @ weight.T + bias).argmax(dim=1) == y).float().mean())


# ---------------------------------------------------------------- k-NN


def knn_votes(
    bank: torch.Tensor,
    bank_y: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
) -> torch.Tensor:
    """(queries, classes) summed votes: each query's ``k`` most cosine-similar bank
    features vote for their class with weight ``exp(similarity / temperature)``."""
    bank = F.normalize(bank, dim=1)
    k = min(k, len(bank))
    out = []
    for q in F.normalize(queries, dim=1).split(KNN_CHUNK):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        out.append(votes.scatter_add_(1, bank_y[idx], (sim / temperature).exp()))
    return torch.cat(out)


# ---------------------------------------------------------------- the baselines


def _run(
    config: FeatureConfig,
    model_id: str,
    data: ImageData,
    ctx: BaselineContext,
    fit: Callable[[torch.Tensor, torch.Tensor, Split | None], Fitted],
) -> BaselineResult:
    """Shared by both: load, extract (timed with the fit), ``fit`` the classifier,
    score the test images. ``fit(train_x, train_y, val)`` returns (scores of test
    features -> (n, classes), validation accuracy, trainable parameters)."""
    from timm.data import resolve_model_data_config

    model = load(model_id, config.image_size).to(ctx.device)
    data_cfg = resolve_model_data_config(model)
    # timm's data config keeps the checkpoint's resolution when img_size is overridden
    size = config.image_size or int(data_cfg["input_size"][-1])
    normalise = (size, tuple(data_cfg["mean"]), tuple(data_cfg["std"]))
    ctx = fit_to_budget(
        ctx, model.forward_features, data.train_x, normalise, parameter_bytes(model)
    )
    clock = Stopwatch(ctx)
    train_t: list[float] = []
    eval_t: list[float] = []
    y_train = data.train_y.to(ctx.device)
    with clock.time(train_t):
        f_train = extract(model, data.train_x, config.features, size, data_cfg, ctx)
        val = None
        if data.val_x is not None:
            f_val = extract(model, data.val_x, config.features, size, data_cfg, ctx)
            val = (f_val, data.val_y.to(ctx.device))
        classify, val_accuracy, trainable = fit(f_train, y_train, val)
    with clock.time(eval_t):
        f_test = extract(model, data.test_x, config.features, size, data_cfg, ctx)
        top1, top5 = topk_correct(classify(f_test), data.test_y.to(ctx.device))
    energy = clock.energy()
    probe = torch.zeros(1, 3, size, size, device=ctx.device)
    stored = [f_train, f_test] + ([val[0]] if val is not None else [])
    return BaselineResult(
        accuracy=top1 / len(data.test_y),
        top5_accuracy=top5 / len(data.test_y),
        val_accuracy=val_accuracy,
        params_total=sum(p.numel() for p in model.parameters()) + trainable,
        params_trainable=trainable,
        macs=call_macs(lambda: model.forward_features(probe)),
        train_time_s=train_t[0],
        eval_time_s=eval_t[0],
        params_bytes=parameter_bytes(model),
        batch_bytes=min(ctx.batch_size, len(data.test_y)) * 3 * size * size * 4,
        work_bytes=sum(f.numel() * 4 for f in stored) + trainable * 4,
        energy=energy,
        batch_size_used=ctx.batch_size,
    )


@BASELINES.register(config_cls=LinearProbeConfig, check_model=check_model)
def dinov2_linear(
    config: LinearProbeConfig, model_id: str, data: ImageData, ctx: BaselineContext
) -> BaselineResult:
    """DINOv2 linear probe: logistic regression on frozen features, C chosen on validation."""

    def fit(x: torch.Tensor, y: torch.Tensor, val: Split | None) -> Fitted:
        n = data.num_classes
        if val is not None:
            c, val_accuracy, (weight, bias) = select_c((x, y), val, n, config)
        else:
            c, val_accuracy = config.c_values[0], None
            if len(config.c_values) > 1:
                kept, held = _split(y, config.holdout, ctx.seed)
                c = select_c((x[kept], y[kept]), (x[held], y[held]), n, config)[0]
            weight, bias = fit_logistic(x, y, n, c, config.max_iter)
        log.info("linear probe: C=%g", c)
        return (lambda f: f @ weight.T + bias), val_accuracy, weight.numel() + bias.numel()

    return _run(config, model_id, data, ctx, fit)


@BASELINES.register(config_cls=KnnConfig, check_model=check_model)
def dinov2_knn(
    config: KnnConfig, model_id: str, data: ImageData, ctx: BaselineContext
) -> BaselineResult:
    """DINOv2 weighted k-NN: temperature-weighted votes of the k most similar features."""

    def fit(x: torch.Tensor, y: torch.Tensor, val: Split | None) -> Fitted:
        def classify(f: torch.Tensor) -> torch.Tensor:
            return knn_votes(x, y, f, data.num_classes, config.k, config.temperature)

        val_accuracy = None
        if val is not None:
            val_accuracy = topk_correct(classify(val[0]), val[1])[0] / len(val[1])
        return classify, val_accuracy, 0

    return _run(config, model_id, data, ctx, fit)
