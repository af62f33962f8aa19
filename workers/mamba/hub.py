"""Released weights of the Mamba backbones, from the Hugging Face hub.

Neither Vim nor MambaVision is in timm, so a grid's ``pretrained: hub`` (or an
``hf-hub:`` id) names a file in a hub repository, downloaded into the Hugging Face
cache and then loaded like a local file (``weights_only``, strict keys).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"


@dataclass(frozen=True)
class HubWeights:
    """A weights file in a hub repository."""

    repo: str  # "org/name"
    filename: str  # path inside the repository


def resolve(ref: str, default: HubWeights | None) -> HubWeights:
    """The file that a grid's hub reference names.

    ``"hub"``: the variant's released weights (``default``); ``"hf-hub:org/name"``: the
    file of ``default``'s name in that repository (a fine-tuned copy, say);
    ``"hf-hub:org/name/path/to/file"``: that file.

    Example:
        >>> resolve("hf-hub:me/vim-ft", HubWeights("hustvl/Vim-small-midclstok", "w.pth"))
        HubWeights(repo='me/vim-ft', filename='w.pth')
    """
    if ref == "hub":
        if default is None:
            raise ValueError("this backbone has no released weights; give a local file")
        return default
    if not ref.startswith(HUB_PREFIX):
        raise ValueError(f"not a hub reference: {ref!r} (use 'hub' or '{HUB_PREFIX}org/name')")
    parts = ref.removeprefix(HUB_PREFIX).split("/", 2)
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"hub reference {ref!r} must be {HUB_PREFIX}org/name[/file]")
    if len(parts) == 3:
        return HubWeights(f"{parts[0]}/{parts[1]}", parts[2])
    if default is None:
        raise ValueError(f"hub reference {ref!r} names no file: use {HUB_PREFIX}org/name/file")
    return HubWeights(f"{parts[0]}/{parts[1]}", default.filename)


def download(weights: HubWeights) -> Path:
    """The local path of ``weights`` (the Hugging Face cache; downloaded when missing)."""
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(weights.repo, weights.filename))
    except (OSError, ValueError) as exc:  # offline, unknown repository or file
        raise RuntimeError(
            f"could not download pretrained weights {weights.repo}/{weights.filename} ({exc}); "
            "when offline, give a local file as `pretrained: /path/to/weights.pth`"
        ) from exc
    log.info("pretrained weights %s/%s: %s", weights.repo, weights.filename, path)
    return path
