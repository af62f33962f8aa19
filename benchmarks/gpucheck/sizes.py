"""Every size the check uses, in one place: the real ones for a GPU, the tiny ones for ``--cpu``.

The tiny sizes run the same code on the tiny test backbones; their budgets are chosen so
that the same outcomes are expected (``none`` over its budget, the others inside it) with
the accounted cap of a CPU trial instead of the CUDA allocator's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The paper grid's method arguments (grid/paper.yaml); the others take their defaults.
METHOD_ARGS: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "alpha": 16},
    "adalora": {"init_r": 12, "target_r": 8},
    "qlora": {"r": 8, "alpha": 16, "compute_dtype": "bf16", "double_quant": True},
}


@dataclass(frozen=True)
class CapSizes:
    backbone: str
    batch: int
    budget_mb: float
    steps: int
    margin_mb: float  # adaptive's workspace beside the accounted memory (paper grid: 64)


@dataclass(frozen=True)
class PackingSizes:
    backbone: str
    batch: int
    budget_mb: float
    steps: int
    trials: int
    threads: int  # cpus_per_trial: torch threads of each worker process
    margin_mb: float


@dataclass(frozen=True)
class CheckpointSizes:
    models: tuple[tuple[str, str, int, int], ...]  # (label, backbone, batch, img_size)
    fraction: float  # adaptive's budget: this share of the unconstrained activations
    warmup: int
    rounds: int  # every strategy timed once per round, round-robin (drift hits all alike)
    steps: int  # timed steps per strategy and round
    compile_budget: bool  # also torch.compile's activation_memory_budget (CUDA, ViT)


@dataclass(frozen=True)
class EnergySizes:
    backbone: str
    batch: int
    window_s: float  # the training window both meters measure
    idle_s: float  # the idle window before it (idle power)
    poll_hz: float


@dataclass(frozen=True)
class MfuSizes:
    backbone: str
    batch: int
    trial_steps: int  # run_trial's own loop (images/s from its record)
    loop_steps: int  # a bare forward + backward + AdamW loop on one batch


@dataclass(frozen=True)
class MethodSizes:
    transformer: str  # every method but mobiletl
    cnn: str  # mobiletl
    batch: int
    steps: int
    budget_mb: float
    lr: float
    checkpointing: str  # adaptive fits ViT-S under 2 GiB; the tiny models need none
    margin_mb: float = 64.0  # adaptive's CUDA workspace (the paper grid's)


@dataclass(frozen=True)
class MambaSizes:
    models: tuple[tuple[str, str], ...]  # (label, backbone)
    batch: int
    fallback_batch: int  # when a scan does not fit at ``batch``
    warmup: int
    steps: int


@dataclass(frozen=True)
class Sizes:
    cap: CapSizes
    packing: PackingSizes
    checkpointing: CheckpointSizes
    energy: EnergySizes
    mfu: MfuSizes
    methods: MethodSizes
    mamba: MambaSizes
    precision: str = "bf16"  # the paper grid's
    img_size: int = 0  # input resolution of every backbone but the Mamba ones (0: native)
    # torch threads of a part's process (1 on a shared CPU: busy-waiting OpenMP threads
    # on oversubscribed cores slow a step down many times)
    threads: int = 4
    # 32 px stripes, resized on the device to each backbone's input (224 px on a GPU)
    dataset: dict[str, Any] = field(
        default_factory=lambda: {"num_classes": 10, "images_per_class": 64, "image_size": 32}
    )


GPU = Sizes(
    cap=CapSizes("vit_small_patch16_224", batch=64, budget_mb=2048, steps=4, margin_mb=64),
    packing=PackingSizes(
        "vit_small_patch16_224", batch=32, budget_mb=2048, steps=60, trials=8, threads=2,
        margin_mb=64,
    ),
    checkpointing=CheckpointSizes(
        models=(("ViT-S/16", "vit_small_patch16_224", 64, 0), ("Vim-S", "vim_small", 32, 0)),
        fraction=0.5, warmup=3, rounds=2, steps=5, compile_budget=True,
    ),
    energy=EnergySizes("vit_small_patch16_224", batch=128, window_s=60.0, idle_s=5.0, poll_hz=20),
    mfu=MfuSizes("vit_small_patch16_224", batch=256, trial_steps=40, loop_steps=15),
    methods=MethodSizes(
        "vit_small_patch16_224", "mobilenetv2_100", batch=32, steps=20, budget_mb=2048, lr=1e-3,
        checkpointing="adaptive",
    ),
    mamba=MambaSizes(
        (("Vim-S", "vim_small"), ("MambaVision-T", "mambavision_t")),
        batch=32, fallback_batch=8, warmup=1, steps=3,
    ),
)  # fmt: skip

TINY = Sizes(
    img_size=16,
    threads=1,
    # 16 px: on a CPU the whole dataset is "resident on the device", and adaptive's plan
    # counts it against the budget
    dataset={"num_classes": 10, "images_per_class": 64, "image_size": 16},
    # vit_test at 16 px + LoRA, batch 64, bf16: none accounts 4.9 MiB, static 2.5 MiB
    cap=CapSizes("vit_test", batch=64, budget_mb=3.5, steps=3, margin_mb=0),
    packing=PackingSizes(
        "vit_test", batch=16, budget_mb=64, steps=3, trials=2, threads=1, margin_mb=0
    ),
    checkpointing=CheckpointSizes(
        models=(("tiny ViT", "vit_test", 32, 16), ("tiny Vim", "vim_test", 8, 0)),
        fraction=0.5, warmup=1, rounds=2, steps=2, compile_budget=False,
    ),
    energy=EnergySizes("vit_test", batch=32, window_s=1.0, idle_s=0.2, poll_hz=20),
    mfu=MfuSizes("vit_test", batch=32, trial_steps=4, loop_steps=3),
    methods=MethodSizes(
        "vit_test", "mobilenetv2_test", batch=16, steps=10, budget_mb=256, lr=3e-3,
        checkpointing="none",
    ),
    mamba=MambaSizes(
        (("tiny Vim", "vim_test"), ("tiny MambaVision", "mambavision_test")),
        batch=4, fallback_batch=2, warmup=1, steps=2,
    ),
)  # fmt: skip


def sizes(tiny: bool) -> Sizes:
    return TINY if tiny else GPU
