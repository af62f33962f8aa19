"""What every baseline receives and returns; the baseline registry; model-id checks.

A baseline is a training-free trial (kind ``baseline``): a foundation model evaluated
on the trial's dataset as it is (zero-shot, a probe on frozen features, a prompted
VLM). Its grid entry names the model with ``backbone:`` (it becomes
``TrialSpec.backbone``), every other key is an argument of the baseline's config:

    baselines:
      - {name: dinov2_knn, backbone: vit_small_patch14_dinov2.lvd142m, k: 20}

Model ids are checked when the grid is validated, without the network: a local
folder must exist and hold the files of its format; a hub id passes when the machine
may download (the trial downloads it), and must already be in the local Hugging Face
cache when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.batch_fit import fit_batch
from workers.cost import forward_peak_bytes
from workers.data import ImageData, batches
from workers.eval_batch import EVAL_BATCH_FLOOR
from workers.registry import NoArgs, Registry, RegistryError

log = logging.getLogger(__name__)

# The grid key of a baseline entry that names its model (TrialSpec.backbone).
MODEL_KEY = "backbone"
# A model id with this prefix, or one that starts like a path, names a local folder.
LOCAL_PREFIX = "local-dir:"
PATH_STARTS = ("/", "./", "../", "~")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

ModelCheck = Callable[[str], None]


class BaselineRegistry(Registry):
    """A registry whose entries also check the model a grid names for them.

    ``resolve_args`` takes the grid entry's arguments *with* ``backbone``: it checks
    the model id (``check_model`` of the entry, no network) and validates the rest
    against the config; the result keeps ``backbone`` beside the resolved arguments
    for grid expansion to move into ``TrialSpec.backbone``. ``make_config`` and
    ``build`` take the arguments without it (``TrialSpec.baseline_args``).
    """

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self._checks: dict[str, ModelCheck] = {}

    def register(  # type: ignore[override]
        self,
        name: str | None = None,
        *,
        config_cls: type = NoArgs,
        check_model: ModelCheck,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register ``fn`` with its config and the check of its model ids."""
        add = super().register(name, config_cls=config_cls)

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            add(fn)
            self._checks[name or fn.__name__] = check_model
            return fn

        return decorate

    def check_model(self, name: str, model_id: str) -> None:
        """Raise ``RegistryError`` saying how to fix it when ``model_id`` cannot load."""
        check = self._checks[self.get(name).name]
        try:
            check(model_id)
        except (ValueError, OSError) as exc:
            raise RegistryError(f"{self.kind} {name!r}: {MODEL_KEY} {model_id!r}: {exc}") from None

    def resolve_args(self, name: str, args: dict[str, Any] | None) -> dict[str, Any]:
        args = dict(args or {})
        model_id = args.pop(MODEL_KEY, None)
        resolved = super().resolve_args(name, args)
        if not isinstance(model_id, str) or not model_id:
            raise RegistryError(
                f"{self.kind} {name!r}: name its model as `{MODEL_KEY}: <model id>`, "
                f"got {model_id!r}"
            )
        self.check_model(name, model_id)
        return {MODEL_KEY: model_id, **resolved}


BASELINES = BaselineRegistry("baseline")


@dataclass(frozen=True)
class BaselineContext:
    """Facts about the trial that a baseline needs besides its config and data."""

    dataset: str  # registry name of the dataset: picks prompt templates and questions
    device: torch.device
    batch_size: int  # images per forward of an image encoder (the grid's eval_batch_size)
    precision: str  # fp32 | bf16 | fp16 (the grid's train.precision)
    autocast: Any  # the context manager of that precision on the device (re-enterable)
    seed: int
    meter: Any = None  # workers.energy.EnergyMeter of the trial; None: energy not measured
    # the trial's budget: ``fit_to_budget`` halves batch_size until a forward fits it
    budget_bytes: int | None = None


@dataclass
class BaselineResult:
    """What a baseline measured. Times are wall seconds, synchronised with the device.

    ``train_time_s`` is the work done before any test image is seen: feature
    extraction of the training (and validation) images and probe fitting, or building
    the zero-shot classifier from the class names. ``eval_time_s`` is the rest.
    Bytes are what the accounted memory of a CPU trial counts: the model, the largest
    input batch, and the largest set of features, embeddings or key/value caches held.
    Energy covers the same phases as the two times (not the loading of the model).
    """

    accuracy: float
    top5_accuracy: float
    val_accuracy: float | None = None
    generation_accuracy: float | None = None  # vlm_prompt: free answers matched to classes
    params_total: int = 0
    params_trainable: int = 0  # parameters fitted on the data (a probe's), 0 if none
    macs: int | None = None  # forward multiply-accumulates per image of the model's image path
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    params_bytes: int = 0
    batch_bytes: int = 0
    work_bytes: int = 0
    energy: Any = None  # workers.energy.EnergyMeasurement of the timed phases, if metered
    batch_size_used: int | None = None  # images per forward of the image encoder


def run_baseline(
    name: str, args: dict[str, Any], model_id: str, data: ImageData, ctx: BaselineContext
) -> BaselineResult:
    """Evaluate baseline ``name`` (config ``args``) with model ``model_id`` on ``data``.

    The model id is checked first, as grid validation does, so that a trial built by
    hand fails with the same message."""
    if not model_id:
        raise ValueError(
            f"baseline {name!r} needs a model: TrialSpec.backbone (the grid entry's "
            f"`{MODEL_KEY}:`) is empty"
        )
    BASELINES.check_model(name, model_id)
    return BASELINES.build(name, args, model_id, data, ctx)


# ---------------------------------------------------------------- model ids


def local_dir(model_id: str) -> Path | None:
    """The folder ``model_id`` names (``local-dir:PATH``, or a path starting with
    ``/``, ``./``, ``../`` or ``~``), or None for a hub or registry id."""
    if model_id.startswith(LOCAL_PREFIX):
        return Path(model_id[len(LOCAL_PREFIX) :]).expanduser()
    if model_id.startswith(PATH_STARTS):
        return Path(model_id).expanduser()
    return None


def require_files(folder: Path, names: tuple[str, ...], fmt: str) -> None:
    """Fail unless ``folder`` exists and holds one of ``names`` (the files of ``fmt``)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}: give the folder of a model saved by {fmt}")
    if not any((folder / n).is_file() for n in names):
        raise FileNotFoundError(f"{folder} holds none of {list(names)}: not saved by {fmt}")


def hub_offline() -> bool:
    """Whether the Hugging Face libraries may not download (read now, not at import)."""
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in OFFLINE_ENV)


def require_cached(repo_id: str, *filenames: str) -> None:
    """When offline, fail unless one of ``filenames`` of hub repo ``repo_id`` is in the
    local cache (alternatives: a checkpoint may be stored as safetensors or pickle)."""
    if not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    if not any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames):
        raise FileNotFoundError(
            f"hub repo {repo_id!r} is not in the local Hugging Face cache and downloads are "
            f"off ({'/'.join(OFFLINE_ENV)} is set): run `hf download {repo_id}` on a machine "
            "with network and copy its cache here, or give a local folder as the model id"
        )


def load_error(model_id: str, exc: Exception) -> RuntimeError:
    """A loading failure that says how to make the model available."""
    return RuntimeError(
        f"could not load model {model_id!r} ({type(exc).__name__}: {exc}); when offline, "
        "give a local folder (`local-dir:/path`) or fill the Hugging Face cache beforehand"
    )


# ---------------------------------------------------------------- measuring


class Stopwatch:
    """Wall time of a baseline's phases, synchronised with the device, and the energy
    of all of them together: the meter's window opens when the first phase starts
    (after the model is loaded) and closes in ``energy()``."""

    def __init__(self, ctx: BaselineContext) -> None:
        self.device, self.meter = ctx.device, ctx.meter

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def time(self, into: list[float]) -> Iterator[None]:
        """Append the seconds the block took to ``into``."""
        if self.meter is not None and not self.meter.window_open:
            self.meter.begin_window()
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        into.append(time.perf_counter() - start)

    def energy(self) -> Any:
        """The ``EnergyMeasurement`` of the phases so far (None without a meter)."""
        if self.meter is None or not self.meter.window_open:
            return None
        return self.meter.end_window()


def fit_to_budget(
    ctx: BaselineContext,
    forward: Callable[[torch.Tensor], Any],
    images: torch.Tensor,
    normalise: tuple[int, tuple[float, ...], tuple[float, ...]],
    resident_bytes: int,
) -> BaselineContext:
    """``ctx`` with its batch size halved until ``resident_bytes`` (the model; on CUDA the
    allocator's bytes instead) + one ``forward`` fits ``ctx.budget_bytes``, its bytes per
    image measured on the first of the uint8 ``images`` (resized and normalised by
    ``normalise``: size, mean, std) and scaled (``workers.batch_fit``); OverBudget naming
    feature extraction below the floor."""
    if ctx.budget_bytes is None:
        return ctx
    size, mean, std = normalise
    first = images[:EVAL_BATCH_FLOOR]
    labels = torch.zeros(len(first), dtype=torch.long, device=first.device)
    feed = batches(first, labels, len(first), size=size, mean=mean, std=std, device=ctx.device)
    probe = next(iter(feed))[0]
    if ctx.device.type == "cuda":
        resident_bytes = torch.cuda.memory_allocated(ctx.device)
    with torch.no_grad(), ctx.autocast:
        per_image = forward_peak_bytes(lambda: forward(probe), probe, ctx.device) / len(probe)
    fit = fit_batch(
        per_image_bytes=per_image,
        resident_bytes=resident_bytes,
        budget_bytes=ctx.budget_bytes,
        requested=ctx.batch_size,
        floor=EVAL_BATCH_FLOOR,
        phase="feature extraction",
    )
    return dataclasses.replace(ctx, batch_size=fit.batch_size)


def parameter_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def topk_correct(scores: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Top-1 and top-5 (top-k for fewer classes) hits of ``scores`` (n, classes); a class
    whose score is -inf (not a candidate) never counts as a hit."""
    k = min(5, scores.shape[1])
    values, index = scores.topk(k, dim=1)
    hit = (index == labels[:, None]) & torch.isfinite(values)
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


def class_names(data: ImageData) -> tuple[str, ...]:
    """The dataset's class names; baselines that read them fail clearly without them."""
    if not data.classes:
        raise ValueError("this baseline needs the class names of the dataset (ImageData.classes)")
    return data.classes
