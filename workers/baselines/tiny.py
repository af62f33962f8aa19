"""Tiny randomly initialised baseline models, written in the real on-disk formats.

The tests and the benchmark load them through the same code as real checkpoints
(a local folder given as the model id, the offline route): an open_clip folder
(``open_clip_config.json`` + safetensors), a timm hub-format folder of a
DINOv2-shaped ViT, and ``save_pretrained`` folders of a PaliGemma or an Idefics3
(SmolVLM) model with a word-level tokenizer built here (no download, no
sentencepiece). Nothing here is used by a sweep.

Example:
    >>> folder = write_dinov2(tmp_path / "dino")
    >>> BASELINES.check_model("dinov2_knn", f"local-dir:{folder}")  # as grid validation does
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

VLM_FAMILIES = ("paligemma", "smolvlm")
WORD = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer splits on
# SmolVLM's chat template, reduced to what a single-image question needs
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def write_open_clip(folder: Path, seed: int = 0) -> Path:
    """A CLIP with one-layer towers at 16 px (open_clip's bundled BPE tokenizer)."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 16,
            "layers": 1,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 24,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.CLIP(**model_cfg)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def write_dinov2(folder: Path, seed: int = 0) -> Path:
    """timm's ``vit_small_patch14_dinov2`` architecture at width 32, depth 2, 28 px."""
    import timm
    from timm.models import save_for_hf

    args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model("vit_small_patch14_dinov2", num_classes=0, **args)
    save_for_hf(model, str(folder), model_args=args, safe_serialization=True)
    return folder


def write_vlm(
    folder: Path,
    family: str,
    texts: Sequence[str],
    *,
    image_size: int = 16,
    patch_size: int = 8,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """A ``family`` (paligemma | smolvlm) model and processor whose tokenizer knows
    the words of ``texts`` (questions, class names) and of the family's prompt."""
    if family not in VLM_FAMILIES:
        raise ValueError(f"family must be one of {list(VLM_FAMILIES)}, got {family!r}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if family == "paligemma":
        special = ["<pad>", "<unk>", "<bos>", "<eos>", "<image>"]
        bos, eos = "<bos>", "<eos>"
    else:
        special = ["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>", "<image>"]
        special += ["<fake_token_around_image>", "<global-img>"]
        bos, eos = "<|im_start|>", "<end_of_utterance>"
        texts = [*texts, "User Assistant :"]
    words = sorted({w for t in texts for w in WORD.findall(t)} - set(special))
    vocab = {w: i for i, w in enumerate(special + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": special[4:]})
    ids = {"bos_token_id": vocab[bos], "eos_token_id": vocab[eos], "pad_token_id": 0}
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": len(vocab),
        **ids,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    patches = (image_size // patch_size) ** 2
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if family == "paligemma":
            model, processor = _paligemma(tokenizer, text, vision, vocab["<image>"], patches)
        else:
            model, processor = _smolvlm(tokenizer, text, vision, vocab["<image>"], patches)
    model.generation_config.update(**ids)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


def _paligemma(
    tokenizer: Any, text: dict[str, Any], vision: dict[str, Any], image_token: int, patches: int
) -> tuple[Any, Any]:
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    config = PaliGemmaConfig(
        vision_config={"model_type": "siglip_vision_model", "projection_dim": 32, **vision},
        text_config={"model_type": "gemma", "head_dim": 16, **text},
        image_token_id=image_token,
        projection_dim=32,
    )
    size = vision["image_size"]
    images = SiglipImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    images.image_seq_length = patches  # PaliGemma's processor reads it
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer)
    return PaliGemmaForConditionalGeneration(config), processor


def _smolvlm(
    tokenizer: Any, text: dict[str, Any], vision: dict[str, Any], image_token: int, patches: int
) -> tuple[Any, Any]:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    scale = 2  # pixel shuffle: 4 patches make one image token
    config = Idefics3Config(
        vision_config=vision,
        text_config={"model_type": "llama", **text},
        image_token_id=image_token,
        scale_factor=scale,
    )
    edge = {"longest_edge": vision["image_size"]}
    images = Idefics3ImageProcessor(
        size=edge,
        max_image_size=edge,
        do_image_splitting=False,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = Idefics3Processor(
        image_processor=images,
        tokenizer=tokenizer,
        image_seq_len=patches // scale**2,
        chat_template=SMOLVLM_TEMPLATE,
    )
    return Idefics3ForConditionalGeneration(config), processor
