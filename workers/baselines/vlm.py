"""Prompted autoregressive VLMs as classifiers (PaliGemma, SmolVLM) via transformers.

The paper's protocol asks the model a question about the image and reads its
answer. Two readings are measured:

- ranking (``accuracy``, ``top5_accuracy``): every class name is scored as the
  answer by its log-likelihood given the image and the question, and the best wins.
  The image + question prefix runs once per image; its key/value cache is copied
  to every candidate answer, so a candidate costs only its own few tokens (the naive
  way, ``naive_scores``, runs the whole sequence, vision tower included, per class).
  ``prefilter_k`` scores fully only the classes whose first answer token is among
  the k likeliest after the prefix (read from the prefix's last logits: free).
- free generation (``generation_accuracy``): a greedy answer of a few tokens,
  normalised (lower case, no punctuation or articles) and matched to a class name.

PaliGemma (Beyer et al. 2024, https://arxiv.org/abs/2407.07726) reads its prefix
bidirectionally (prefix-LM) and the answer causally; the cached scoring keeps that,
since the prefix is run alone with its token types and the answer tokens attend
causally to it. SmolVLM (Marafioti et al. 2025, https://arxiv.org/abs/2504.05299)
is prompted through its processor's chat template.

Model ids (``backbone:`` of the grid entry): a hub id (``google/paligemma-3b-mix-224``,
``HuggingFaceTB/SmolVLM-256M-Instruct``) or a local ``save_pretrained`` folder of the
model and its processor (``local-dir:PATH`` or a path starting with ``/ ./ ../ ~``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.baselines import prompts
from workers.baselines.base import (
    BASELINES,
    BaselineContext,
    BaselineResult,
    Stopwatch,
    class_names,
    load_error,
    local_dir,
    parameter_bytes,
    require_cached,
    require_files,
    topk_correct,
)
from workers.batch_fit import fit_batch
from workers.cost import call_macs, forward_peak_bytes
from workers.data import ImageData

log = logging.getLogger(__name__)

SCORES = ("sum", "mean")
# A VLM's forward is large and its scoring per image anyway: one image per prefix forward
# is a usable floor (the fitted batch is probed at it)
IMAGE_BATCH_FLOOR = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


@dataclass(frozen=True)
class VlmPromptConfig:
    """Arguments of ``vlm_prompt``."""

    # asked about every image; "" = the dataset's question (prompts.QUESTIONS) with the
    # model's task prefix (PaliGemma: "answer en ")
    question: str = ""
    score: str = "sum"  # sum | mean of the answer's token log-likelihoods
    end_token: bool = True  # score the end-of-answer token too (tells "cat" from "caterpillar")
    prefilter_k: int = 0  # > 0: score fully only the top-k classes by first-token likelihood
    image_batch: int = 8  # images per prefix forward
    candidate_batch: int = 64  # (image, class name) answers per cached forward
    generation_tokens: int = 8  # greedy tokens of the free answer; 0 = no generation accuracy
    # passed to the processor, e.g. {do_image_splitting: false} for SmolVLM on small images
    processor_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {list(SCORES)}, got {self.score!r}")
        for name in ("image_batch", "candidate_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefilter_k < 0 or self.generation_tokens < 0:
            raise ValueError(
                "prefilter_k and generation_tokens must be >= 0, got "
                f"{self.prefilter_k} and {self.generation_tokens}"
            )


def check_model(model_id: str) -> None:
    """A local folder must hold a transformers model and processor; a hub id must be
    ORG/NAME and, offline, in the cache."""
    folder = local_dir(model_id)
    if folder is not None:
        require_files(folder, ("config.json",), "transformers")
        processor = ("processor_config.json", "preprocessor_config.json")
        require_files(folder, processor, "a transformers processor")
        return
    if model_id.count("/") != 1:
        raise ValueError("give a hub id ORG/NAME or a local folder (local-dir:/path)")
    require_cached(model_id, "config.json")


def load(model_id: str, ctx: BaselineContext) -> tuple[Any, Any]:
    """The model (in the trial's precision, eval mode, on its device) and processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = local_dir(model_id)
    source = str(folder) if folder is not None else model_id
    try:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=DTYPES[ctx.precision])
    except (OSError, ValueError) as exc:
        raise load_error(model_id, exc) from exc
    return model.to(ctx.device).eval(), processor


def normalise(text: str) -> str:
    """Lower case, punctuation and articles removed, single spaces (SQuAD-style)."""
    text = ARTICLES.sub(" ", text.lower().translate(PUNCTUATION))
    return " ".join(text.split())


def match(answer: str, names: Sequence[str]) -> int:
    """The class whose normalised name is the normalised answer, else the longest one
    the answer contains as whole words; -1 if none (or two equally long) match."""
    answer = normalise(answer)
    if answer in names:
        return names.index(answer)
    found = [(len(n), i) for i, n in enumerate(names) if n and f" {n} " in f" {answer} "]
    if not found:
        return -1
    found.sort(reverse=True)
    if len(found) > 1 and found[0][0] == found[1][0]:
        return -1
    return found[0][1]


@dataclass
class Prefix:
    """The image + question prefix of a batch after one forward."""

    inputs: dict[str, torch.Tensor]  # the processor's tensors, on the device
    last: torch.Tensor  # (batch, vocab) log-probabilities of the first answer token
    cache: Any  # transformers Cache of the prefix (batch rows)


class Prompter:
    """Asks one VLM one question about images and scores class names as its answers.

    ``candidates`` (classes, longest answer) holds every class name's answer tokens
    (a separating space when the prompt does not end in whitespace, the end token
    when ``config.end_token``), padded; ``lengths`` their token counts.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        classes: Sequence[str],
        question: str,
        config: VlmPromptConfig,
        image_shape: Sequence[int],
    ) -> None:
        self.model, self.processor, self.config = model, processor, config
        self.device = next(model.parameters()).device
        self.work_bytes = 0  # the largest key/value caches held at once
        self.batch_bytes = 0  # the largest pixel batch
        self.tokenizer = processor.tokenizer
        self.text = self._prompt_text(question)
        self.eos_ids = self._eos_ids()
        self.names = [normalise(c) for c in classes]
        blank = torch.zeros(tuple(image_shape), dtype=torch.uint8)
        last_token = int(self.inputs([blank])["input_ids"][0, -1])
        ends_in_space = self.tokenizer.decode([last_token])[-1:].isspace()
        separator = "" if ends_in_space else " "
        encoded = [self.tokenizer.encode(separator + c, add_special_tokens=False) for c in classes]
        if not all(encoded):
            raise ValueError(f"class name {classes[encoded.index([])]!r} encodes to no token")
        answers = [e + ([self.eos_ids[0]] if config.end_token else []) for e in encoded]
        self.lengths = torch.tensor([len(a) for a in answers], device=self.device)
        self.candidates = torch.zeros(
            len(answers), int(self.lengths.max()), dtype=torch.long, device=self.device
        )
        for i, a in enumerate(answers):
            self.candidates[i, : len(a)] = torch.tensor(a)

    def _prompt_text(self, question: str) -> str:
        """The prompt as the model was trained to read it: the processor's chat template
        when it has one, else the image token and the question (PaliGemma-style
        processors add BOS and the separator themselves)."""
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}, {"type": "text", "text": question}]
            return self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True
            )
        return self.processor.image_token + question

    def _eos_ids(self) -> list[int]:
        """The tokens that end an answer: the generation config's, else the tokenizer's."""
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not ids:
            raise ValueError("the model has no end-of-sequence token to end an answer")
        return ids

    def inputs(self, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The processor's tensors for ``images`` (uint8 CHW) with the prompt, on the device."""
        out = self.processor(
            images=images,
            text=[self.text] * len(images),
            return_tensors="pt",
            **self.config.processor_kwargs,
        )
        out.pop("labels", None)  # PaliGemma's processor adds training labels
        if not bool(out["attention_mask"].all()):
            raise ValueError("the prompts of one batch differ in length (images of other sizes?)")
        dtype = self.model.dtype
        return {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else None)
            for k, v in out.items()
        }

    @torch.no_grad()
    def prefix(self, images: list[torch.Tensor]) -> Prefix:
        inputs = self.inputs(images)
        self.batch_bytes = max(self.batch_bytes, inputs["pixel_values"].nbytes)
        out = self.model(**inputs, use_cache=True)
        return Prefix(inputs, out.logits[:, -1].float().log_softmax(-1), out.past_key_values)

    def shortlist(self, prefix: Prefix) -> torch.Tensor:
        """(batch, classes) mask of the classes to score: all, or with ``prefilter_k``
        those whose first answer token is among the k likeliest (ties kept)."""
        k = self.config.prefilter_k
        first = prefix.last[:, self.candidates[:, 0]]
        if k <= 0 or k >= first.shape[1]:
            return torch.ones_like(first, dtype=torch.bool)
        return first >= first.topk(k, dim=1).values[:, -1:]

    def _reduce(self, token_logp: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = torch.arange(token_logp.shape[1], device=self.device) < lengths[:, None]
        total = token_logp.masked_fill(~valid, 0.0).sum(dim=1)
        return total / lengths if self.config.score == "mean" else total

    @torch.no_grad()
    def scores(self, prefix: Prefix, keep: torch.Tensor) -> torch.Tensor:
        """(batch, classes) answer scores, -inf where ``keep`` is False: the prefix
        cache, copied to each (image, class) row, extended by the answer's tokens."""
        out = torch.full(keep.shape, float("-inf"), device=self.device)
        prefix_bytes = _cache_bytes(prefix.cache)
        for chunk in keep.nonzero().split(self.config.candidate_batch):
            rows, cls = chunk[:, 0], chunk[:, 1]
            lengths = self.lengths[cls]
            tokens = self.candidates[cls, : int(lengths.max())]
            token_logp = prefix.last[rows].gather(1, tokens[:, :1])
            if tokens.shape[1] > 1:
                cache = copy.deepcopy(prefix.cache)
                cache.batch_select_indices(rows)
                logits = self.model(
                    input_ids=tokens[:, :-1], past_key_values=cache, use_cache=True
                ).logits
                self.work_bytes = max(self.work_bytes, prefix_bytes + _cache_bytes(cache))
                rest = logits.float().log_softmax(-1).gather(2, tokens[:, 1:, None]).squeeze(2)
                token_logp = torch.cat([token_logp, rest], dim=1)
            out[rows, cls] = self._reduce(token_logp, lengths)
        return out

    @torch.no_grad()
    def naive_scores(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(batch, classes) the same scores without a cache: one full forward (image,
        question and answer) per class. The reference of the tests and the benchmark."""
        inputs = self.inputs(images)
        batch, start = inputs["input_ids"].shape
        out = torch.empty(batch, len(self.candidates), device=self.device)
        for c, length in enumerate(self.lengths.tolist()):
            answer = self.candidates[c, :length].expand(batch, -1)
            full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], answer[:, :-1]], 1))
            full["attention_mask"] = torch.ones_like(full["input_ids"])
            if "token_type_ids" in inputs:  # the answer is the causal suffix
                suffix = torch.ones_like(answer[:, :-1])
                full["token_type_ids"] = torch.cat([inputs["token_type_ids"], suffix], 1)
            logits = self.model(**full, use_cache=False).logits[:, start - 1 :]
            token_logp = logits.float().log_softmax(-1).gather(2, answer[:, :, None]).squeeze(2)
            out[:, c] = self._reduce(token_logp, self.lengths[c].expand(batch))
        return out

    @torch.no_grad()
    def generate(self, prefix: Prefix) -> list[str]:
        """Greedy answers of at most ``generation_tokens`` tokens; consumes the cache."""
        eos = torch.tensor(self.eos_ids, device=self.device)
        token = prefix.last.argmax(dim=-1)
        steps = [token]
        for _ in range(self.config.generation_tokens - 1):
            if torch.isin(torch.stack(steps, 1), eos).any(dim=1).all():
                break
            logits = self.model(
                input_ids=token[:, None], past_key_values=prefix.cache, use_cache=True
            ).logits
            token = logits[:, -1].argmax(dim=-1)
            steps.append(token)
        answers = []
        for row in torch.stack(steps, 1).tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos_ids), len(row))
            answers.append(self.tokenizer.decode(row[:end], skip_special_tokens=True))
        return answers

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, free: bool) -> tuple[int, int, int]:
        """Top-1, top-5 and (with ``free``) free-generation hits over uint8 images ``x``."""
        top1 = top5 = generated = 0
        for start in range(0, len(y), self.config.image_batch):
            images = list(x[start : start + self.config.image_batch].cpu())
            labels = y[start : start + self.config.image_batch].to(self.device)
            prefix = self.prefix(images)
            hits = topk_correct(self.scores(prefix, self.shortlist(prefix)), labels)
            top1, top5 = top1 + hits[0], top5 + hits[1]
            if free:
                picked = [match(a, self.names) for a in self.generate(prefix)]
                generated += sum(p == t for p, t in zip(picked, labels.tolist(), strict=True))
        return top1, top5, generated


def fit_image_batch(prompter: Prompter, images: torch.Tensor, ctx: BaselineContext) -> int:
    """``prompter``'s image batch halved until what stays allocated (the model; on CUDA the
    allocator's bytes) + the largest chunk of answers + a batch of prefixes fits
    ``ctx.budget_bytes`` (``workers.batch_fit``); OverBudget naming prompting below one image.

    Probed on the first of the uint8 ``images``: a prefix forward with its key/value cache
    (and the copy of that cache the scoring makes) scales with the images; a chunk of
    answers with its rows (at most ``candidate_batch``), whatever the image batch.
    """
    config = prompter.config
    if ctx.budget_bytes is None:
        return config.image_batch
    probe = [images[0].cpu()]
    pixels = prompter.inputs(probe)["pixel_values"]
    held: list[Prefix] = []  # the prefix outlives its forward, as in evaluate()
    device = ctx.device
    prefix_bytes = forward_peak_bytes(lambda: held.append(prompter.prefix(probe)), pixels, device)
    prefix = held.pop()
    keep = prompter.shortlist(prefix)
    scoring = forward_peak_bytes(lambda: prompter.scores(prefix, keep), pixels[:0], device)
    cache = _cache_bytes(prefix.cache)  # one image's; scoring copies the batch's
    rows = min(int(keep.sum()), config.candidate_batch)
    chunk_bytes = max(0, scoring - cache) / rows * config.candidate_batch
    prompter.batch_bytes = prompter.work_bytes = 0  # the probe is no measurement
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated(device) - cache - pixels.nbytes
    else:
        resident = parameter_bytes(prompter.model) + prompter.candidates.nbytes
    return fit_batch(
        per_image_bytes=prefix_bytes + cache,
        resident_bytes=int(resident + chunk_bytes),
        budget_bytes=ctx.budget_bytes,
        requested=config.image_batch,
        floor=IMAGE_BATCH_FLOOR,
        phase="prompting",
    ).batch_size


def _cache_bytes(cache: Any) -> int:
    return sum(
        t.nbytes
        for layer in cache.layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )


@BASELINES.register(config_cls=VlmPromptConfig, check_model=check_model)
def vlm_prompt(
    config: VlmPromptConfig, model_id: str, data: ImageData, ctx: BaselineContext
) -> BaselineResult:
    """Prompted VLM (PaliGemma, SmolVLM): class names ranked by log-likelihood; free answers."""
    model, processor = load(model_id, ctx)
    question = config.question or prompts.question(ctx.dataset, model.config.model_type)
    classes = class_names(data)
    prompter = Prompter(model, processor, classes, question, config, data.test_x.shape[1:])
    batch = fit_image_batch(prompter, data.test_x, ctx)
    prompter.config = config = dataclasses.replace(config, image_batch=batch)
    clock = Stopwatch(ctx)
    eval_t: list[float] = []
    with clock.time(eval_t):
        free = config.generation_tokens > 0
        top1, top5, generated = prompter.evaluate(data.test_x, data.test_y, free)
        val = None
        if data.val_x is not None:
            val = prompter.evaluate(data.val_x, data.val_y, free=False)[0] / len(data.val_y)
    energy = clock.energy()
    n = len(data.test_y)
    one = prompter.inputs([data.test_x[0].cpu()])
    return BaselineResult(
        accuracy=top1 / n,
        top5_accuracy=top5 / n,
        val_accuracy=val,
        generation_accuracy=generated / n if free else None,
        params_total=sum(p.numel() for p in model.parameters()),
        macs=call_macs(lambda: model(**one, use_cache=False)),
        eval_time_s=eval_t[0],
        params_bytes=parameter_bytes(model),
        batch_bytes=prompter.batch_bytes,
        work_bytes=prompter.work_bytes,
        energy=energy,
        batch_size_used=batch,
    )
