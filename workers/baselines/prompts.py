"""Prompt templates (zero-shot) and questions (prompted VLMs), per dataset.

Zero-shot classifiers average the text embeddings of a class name written into
several templates (CLIP, Radford et al. 2021, https://arxiv.org/abs/2103.00020,
section 3.1.4). open_clip ships the ImageNet sets (``open_clip.zero_shot_metadata``);
they are imported, not copied, and serve datasets without a set of their own. The
CIFAR-100, DTD and digit sets follow the per-dataset prompts the CLIP authors
published (https://github.com/openai/CLIP/blob/main/data/prompts.md), shortened.
A template is a ``str.format`` pattern with one ``{}`` for the class name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

Template = Callable[[str], str]

CIFAR100 = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a low resolution photo of the {}.",
    "a pixelated photo of the {}.",
)
DTD = (
    "a photo of a {} texture.",
    "a photo of a {} pattern.",
    "a photo of a {} thing.",
    "a photo of a {} object.",
    "a photo of the {} texture.",
    "a photo of the {} pattern.",
)
DIGITS = (
    'a photo of the number: "{}".',
    'a blurry photo of the digit "{}".',
    'a handwritten digit "{}".',
)

# Template set name -> templates; ``default`` (and every dataset not listed) is
# open_clip's short ImageNet set, ``imagenet`` its 80-template set.
NAMED = ("cifar100", "dtd", "digits", "default", "imagenet")

# The question a prompted VLM is asked about an image, per dataset.
QUESTIONS = {
    "cifar100": "What is the main object in this image? Answer with its name.",
    "dtd": "What texture is shown in this image? Answer with its name.",
    "digits": "Which digit is shown in this image? Answer with the digit.",
}
DEFAULT_QUESTION = "What is in this image? Answer with its name."
# Some VLMs are trained to read a task prefix first (model_type -> prefix):
# PaliGemma's mix checkpoints answer questions given as "answer en <question>".
TASK_PREFIX = {"paligemma": "answer en "}


def templates(name: str) -> tuple[Template, ...]:
    """The templates of set ``name`` (a name of ``NAMED`` or a dataset registry name)."""
    from open_clip import zero_shot_metadata

    own: dict[str, Sequence[str]] = {"cifar100": CIFAR100, "dtd": DTD, "digits": DIGITS}
    if name in own:
        return tuple(t.format for t in own[name])
    if name == "imagenet":
        return tuple(zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)
    return tuple(zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES)


def question(dataset: str, model_type: str) -> str:
    """The default question for ``dataset`` as a VLM of ``model_type`` expects it."""
    return TASK_PREFIX.get(model_type, "") + QUESTIONS.get(dataset, DEFAULT_QUESTION)
