"""The parts of the check, in the order they run, with their time estimates and limits.

Each part is a module of this package with ``run(ctx: PartContext) -> None`` that records
its figures on ``ctx``; it runs in its own process (``benchmarks.gpucheck.part``), killed
at its limit. GPU estimates are guesses for one H100/H200 until a run measures them; the
tiny ones were measured on 2 shared CPU cores under a load of about 10. Importing this
table imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    estimate_s: float  # GPU run, real sizes (a guess until measured)
    limit_s: float
    tiny_estimate_s: float  # --cpu run on 2 shared cores
    tiny_limit_s: float

    @property
    def module(self) -> str:
        return f"{__name__}.{self.name}"

    def estimate(self, tiny: bool) -> float:
        return self.tiny_estimate_s if tiny else self.estimate_s

    def limit(self, tiny: bool) -> float:
        return self.tiny_limit_s if tiny else self.limit_s


PARTS = (
    Part("cap", "Hard cap: ViT-S/16 224 px, batch 64, LoRA, 2 GiB; none -> oom, "
         "static and adaptive fit; NVML vs allocator peaks", 30, 45, 30, 120),
    Part("packing", "Packing: eight 2 GiB trials at once in Ray-like worker processes "
         "vs one after another", 65, 85, 90, 240),
    Part("checkpointing", "Adaptive checkpointing on ViT-S and Vim-S: step time and peak "
         "memory of none, static, adaptive at 50 %, selective (PyTorch SAC)", 55, 75, 25, 150),
    Part("energy", "Energy: NVML counter vs power polling over one training window, idle "
         "power subtracted", 75, 85, 15, 90),
    Part("mfu", "Throughput and MFU: ViT-S full fine-tuning in bf16", 20, 30, 15, 90),
    Part("methods", "Methods on CUDA: 20 steps of each PEFT method at real sizes", 45, 60, 45, 180),
    Part("mamba", "Mamba backbones: chunked vs reference scan, forward + backward, bf16",
         35, 50, 20, 90),
)  # fmt: skip
BY_NAME = {p.name: p for p in PARTS}


def select(names: str | None) -> list[Part]:
    """The parts named in ``names`` ("cap,energy"), in the check's order; all for None."""
    if not names:
        return list(PARTS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; valid: {', '.join(BY_NAME)}")
    return [p for p in PARTS if p.name in wanted]
