"""Foundation-model baselines: training-free trials (kind ``baseline``).

One module per family, each registered under its grid name: ``zeroshot`` (CLIP /
SigLIP through open_clip), ``dinov2_linear`` and ``dinov2_knn`` (frozen DINOv2
features through timm), ``vlm_prompt`` (PaliGemma / SmolVLM through transformers).
Heavy libraries are imported when a baseline runs or checks a model, not here: the
grid validator imports this package.
"""

from workers.baselines import dinov2, vlm, zeroshot  # noqa: F401  (registration)
from workers.baselines.base import (
    BASELINES,
    BaselineContext,
    BaselineResult,
    run_baseline,
)

__all__ = ["BASELINES", "BaselineContext", "BaselineResult", "run_baseline"]
