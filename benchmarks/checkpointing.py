"""Checkpointing under an activation budget: accounted peak and step time, side by side.

For a tiny and a small ViT on CPU, profiles the blocks once, then for each budget
(a fraction of the unconstrained activation bytes) prints:

- the accounted activation peak of ``adaptive`` (measured: bytes saved by the forward,
  and the re-materialisation of a recomputed block during its backward) and its plan
  (blocks kept / pointwise / selective / recomputed / matmul);
- the step time (forward + backward + AdamW step, median after warm-up) of
  ``adaptive`` and of ``static`` (every block recomputed) relative to ``none``,
  measured in the same run, interleaved so that machine noise hits all alike;
- the Griewank-Walther (revolve) lower bound for a chain of that many blocks: the
  least step time of any schedule that stores block inputs in the budget and
  re-runs blocks, from ``revolve_forward_steps`` and the profiled block times.

Then, per strategy, with a cold and a warm block-profile cache (``workers.profile_cache``):
the first step (profiling or reading the cache, then forward + backward + AdamW step),
the steady-state step time (median after warm-up) and the accounted activation peak.

Then every strategy side by side at half the activation memory, ours and PyTorch's:
``none``, ``static``, ``adaptive`` (planned for 0.5 of the unconstrained activation
bytes), ``adaptive w/o matmul`` (the same plan without the ``matmul`` mode: what that
mode buys), ``torch.utils.checkpoint`` on every block (timm's ``set_grad_checkpointing``),
PyTorch's selective activation checkpointing on every block (matmul and attention
outputs saved, the rest recomputed) and ``compiled`` (``torch.compile`` with
``activation_memory_budget`` 0.5): CPU time per step (process time, so that other
processes on a loaded machine do not count; rounds interleave the strategies and the
ratio to ``none`` is taken within each round), the bytes saved for backward, the
measured peak (resident memory above the step's start) and the compile time.

Times are taken with the C allocator as a trial runs it (glibc's default: freed memory
is reused). The measured peaks come from a process of their own in which allocations
of 64 KiB and more are returned to the system at once, so that the resident set
follows the live tensors; that setting makes every large allocation fault its pages
in anew, which costs most where a strategy allocates most (recomputation):
``--allocator release`` times under it too.

    .venv/bin/python benchmarks/checkpointing.py [--steps 10] [--only strategies]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from workers.backbones import create_backbone
from workers.block_compiler import BlockCompiler
from workers.checkpoint_plan import BlockCost, Infeasible, plan, revolve_forward_steps
from workers.checkpointing import (
    HEAD,
    Checkpointer,
    apply_checkpointing,
    block_modes,
    compile_blocks,
    compile_seconds,
    count_modes,
    find_blocks,
    profile_blocks,
    set_mode,
)
from workers.memory import ActivationMeter, reset_rss_high_water_mark, rss_high_water_mark_bytes
from workers.profile_cache import ProfileCache, library_versions

MIB = 1 << 20
MODELS = [  # (label, backbone, backbone args, batch)
    ("tiny ViT (vit_test, 32 px)", "vit_test", {}, 64),
    ("ViT-S/16 (96 px, 36 tokens)", "vit_small_patch16_224", {"img_size": 96}, 16),
]
FRACTIONS = (1.0, 0.75, 0.6, 0.5, 0.4, 0.3)


def _step_time(model, x, y, optimizer, steps: int) -> float:  # noqa: ANN001
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 2:  # warm-up excluded
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak(model, x, y, ckpt: Checkpointer) -> int:  # noqa: ANN001
    meter = ActivationMeter(model, find_blocks(model))
    with meter:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    meter.remove()
    model.zero_grad(set_to_none=True)
    return ckpt.activation_peak(meter)


def _revolve_ratio(profile, budget: int, t_none: float) -> float | None:  # noqa: ANN001
    """Least step time / none's of a schedule that keeps block inputs and one tape."""
    blocks = profile.blocks
    tape = max(b.saved_bytes + b.input_bytes for b in blocks)
    slot = max(b.input_bytes for b in blocks)
    slots = (budget - profile.outside_bytes - tape) // slot
    if slots < 1:
        return None
    n = len(blocks)
    forward = statistics.mean(b.forward_s for b in blocks)
    return 1.0 + revolve_forward_steps(n, min(int(slots), n)) * forward / t_none


def bench(label: str, backbone: str, args: dict, batch: int, steps: int) -> None:
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=10, **args).train()
    size = model.pretrained_cfg["input_size"][-1]
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    profile = profile_blocks(model, lambda: F.cross_entropy(model(x), y))
    unconstrained = profile.unconstrained_bytes
    print(
        f"\n{label}: {len(profile.blocks)} blocks, batch {batch}, unconstrained activations "
        f"{unconstrained / MIB:.1f} MiB"
    )

    apply_checkpointing("none", None, model)
    t_none = _step_time(model, x, y, optimizer, steps)
    static = Checkpointer("static", {}, model)
    static.use(profile)
    static_peak = _peak(model, x, y, static)
    t_static = _step_time(model, x, y, optimizer, steps)
    apply_checkpointing("none", None, model)
    print(
        f"none: {t_none * 1e3:.0f} ms/step; static: peak {static_peak / MIB:.2f} MiB "
        f"({static_peak / unconstrained:.2f}), {t_static / t_none:.2f}x"
    )
    print(
        "| budget (fraction) | adaptive peak MiB | plan save/pointwise/selective/recompute/matmul "
        "| adaptive step vs none | static step vs none | revolve bound |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for fraction in FRACTIONS:
        budget = int(fraction * unconstrained)
        ckpt = Checkpointer("adaptive", {}, model)
        try:
            ckpt.use(profile, budget - profile.prefix_bytes)
        except Infeasible as exc:
            least = (exc.min_peak_bytes + profile.prefix_bytes) / unconstrained
            print(f"| {fraction:.2f} | infeasible (least {least:.2f}) | | | | |")
            continue
        peak = _peak(model, x, y, ckpt)
        counts = count_modes(block_modes(model).values())
        # interleave: none, adaptive, none, static, so drift hits all alike
        saved = block_modes(model)
        apply_checkpointing("none", None, model)
        t0 = _step_time(model, x, y, optimizer, steps)
        for name, block in find_blocks(model):
            set_mode(block, saved[name])
        t_adaptive = _step_time(model, x, y, optimizer, steps)
        static_fits = static_peak <= budget
        if static_fits:
            apply_checkpointing("static", None, model)
        t_static_here = _step_time(model, x, y, optimizer, steps) if static_fits else None
        apply_checkpointing("none", None, model)
        t1 = _step_time(model, x, y, optimizer, steps)
        base = (t0 + t1) / 2
        revolve = _revolve_ratio(profile, budget, base)
        print(
            f"| {fraction:.2f} ({budget / MIB:.1f} MiB) | {peak / MIB:.2f} | {counts} "
            f"| {t_adaptive / base:.2f}x "
            f"| {f'{t_static_here / base:.2f}x' if t_static_here else 'does not fit'} "
            f"| {f'{revolve:.2f}x' if revolve else '-'} |"
        )


def startup(label: str, backbone: str, args: dict, batch: int, steps: int) -> None:
    """First-step and steady-state time, and peak, per strategy, cold and warm cache."""
    print(f"\n{label}: start-up per strategy (adaptive budget: 0.6 of unconstrained)")
    print("| strategy | cache | first step ms | steady step ms | peak MiB | profile from |")
    print("|---|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in ("none", "static", "adaptive"):
            for cache_state in ("cold", "warm"):  # cold writes the entry that warm reads
                row = _startup_row(name, backbone, args, batch, steps, Path(folder))
                print(f"| {name} | {cache_state} | {row} |")


def _startup_row(  # noqa: PLR0913
    name: str, backbone: str, args: dict, batch: int, steps: int, folder: Path
) -> str:
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=10, **args).train()
    size = model.pretrained_cfg["input_size"][-1]
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    unconstrained = profile_blocks(model, lambda: F.cross_entropy(model(x), y), timed=False)
    ckpt = Checkpointer(name, {}, model)
    margin = int(getattr(ckpt.config, "margin_mb", 0) * MIB)
    budget = int(0.6 * unconstrained.unconstrained_bytes) + unconstrained.prefix_bytes + margin
    key = {"bench": backbone, "args": args, "batch": batch, "timed": ckpt.adaptive}
    cache = ProfileCache(key | {"libraries": library_versions()}, folder)
    t0 = time.perf_counter()
    try:
        if ckpt.wants_profile:
            ckpt.prepare(lambda: F.cross_entropy(model(x), y), budget, 0, cache=cache)
    except Infeasible:
        return "infeasible | | | "
    loss = F.cross_entropy(model(x), y)  # the first step
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    first = time.perf_counter() - t0
    steady = _step_time(model, x, y, optimizer, steps)
    peak = _peak(model, x, y, ckpt)
    source = "-" if ckpt.profile_s is None else "cache" if ckpt.profile_cached else "measured"
    return f"{first * 1e3:.0f} | {steady * 1e3:.0f} | {peak / MIB:.2f} | {source}"


def _setup(backbone: str, args: dict, batch: int):  # noqa: ANN202
    """The model (seed 0), a batch and an optimizer: the same in every process."""
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=10, **args).train()
    size = model.pretrained_cfg["input_size"][-1]
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    return model, x, y, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _plan_without(profile, budget: int, kind: str) -> dict[str, str]:  # noqa: ANN001
    """Block modes of the adaptive plan of ``budget`` with the option ``kind`` withheld."""
    costs = [
        BlockCost(c.name, tuple(o for o in c.options if o.kind != kind)) for c in profile.costs()
    ]
    chosen = plan(costs, budget)
    return {n: m for n, m in zip(chosen.names, chosen.choices, strict=True) if n != HEAD}


def _arms(model, plans: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:  # noqa: ANN001
    """Block modes per strategy (the model's blocks compiled for ``compiled``)."""
    compile_blocks(model, BlockCompiler(0.5))
    blocks = find_blocks(model)
    return {
        "none": {n: "save" for n, _ in blocks},
        "static": {n: "recompute" for n, _ in blocks},
        **plans,
        "torch.utils.checkpoint": {n: "save" for n, _ in blocks},
        "PyTorch SAC": {n: "selective" for n, _ in blocks},
        "compiled": {n: "compiled" for n, _ in blocks},
    }


def _use(model, arms: dict[str, dict[str, str]], arm: str) -> None:  # noqa: ANN001
    for name, block in find_blocks(model):
        set_mode(block, arms[arm][name])
    model.set_grad_checkpointing(arm == "torch.utils.checkpoint")


def _figures(backbone: str, args: dict, batch: int, plans: dict[str, dict[str, str]]) -> dict:
    """Saved bytes and measured peak per strategy, in a process of its own whose large
    allocations are returned to the system at once (the resident set follows the live
    tensors)."""
    torch.set_num_threads(1)
    _return_large_allocations_at_once()
    model, x, y, optimizer = _setup(backbone, args, batch)
    arms = _arms(model, plans)
    figures = {}
    for arm in arms:  # a first step: the optimizer's state and the gradients exist
        _use(model, arms, arm)
        _cpu_step_time(model, x, y, optimizer, 1)
        figures[arm] = _memory(model, x, y)
    return figures


def side_by_side(label: str, backbone: str, args: dict, batch: int, rounds: int) -> None:
    """Every strategy at half the activation memory: CPU step time, saved bytes, peak."""
    model, x, y, optimizer = _setup(backbone, args, batch)
    profile = profile_blocks(model, lambda: F.cross_entropy(model(x), y))
    budget = int(0.5 * profile.unconstrained_bytes) - profile.prefix_bytes
    adaptive = Checkpointer("adaptive", {}, model)
    adaptive.use(profile, budget)
    modes = block_modes(model)
    plans = {"adaptive": modes, "adaptive w/o matmul": _plan_without(profile, budget, "matmul")}
    arms = _arms(model, plans)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as apart:  # the peaks, in a process apart
        figures = apart.submit(_figures, backbone, args, batch, plans).result()
    for arm in arms:  # first steps: compilation, the optimizer's state
        _use(model, arms, arm)
        _cpu_step_time(model, x, y, optimizer, 1)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(rounds):
        for arm in arms:
            _use(model, arms, arm)
            times[arm].append(_cpu_step_time(model, x, y, optimizer, 3))
    ratios = {arm: [t / n for t, n in zip(times[arm], times["none"], strict=True)] for arm in arms}
    print(
        f"\n{label}: batch {batch}, every strategy at 0.5 of the unconstrained activations "
        f"({profile.unconstrained_bytes / MIB:.1f} MiB); adaptive plan "
        + "save/pointwise/selective/recompute/matmul "
        + count_modes(modes.values())
        + f" (w/o matmul: {count_modes(plans['adaptive w/o matmul'].values())})"
    )
    print(
        "| strategy | CPU ms/step | vs none (median, range of rounds) | saved MiB "
        "| measured peak MiB | compile s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for arm in arms:
        r = sorted(ratios[arm])
        saved, peak = figures[arm]
        compile_s = f"{compile_seconds(model):.1f}" if arm == "compiled" else "0"
        print(
            f"| {arm} | {statistics.median(times[arm]) * 1e3:.0f} "
            f"| {statistics.median(r):.3f}x ({r[0]:.3f}-{r[-1]:.3f}) "
            f"| {saved / MIB:.1f} | {peak / MIB:.1f} | {compile_s} |"
        )


def _cpu_step_time(model, x, y, optimizer, steps: int) -> float:  # noqa: ANN001
    """Median CPU (process) time of ``steps`` steps after one warm-up step."""
    times = []
    for i in range(steps + 1):
        t0 = time.process_time()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        if i:
            times.append(time.process_time() - t0)
    return statistics.median(times)


def _memory(model, x, y) -> tuple[int, int]:  # noqa: ANN001
    """Bytes saved by the forward (saved-tensor hooks) and the resident peak of forward
    + backward above the step's start (gradients exist already: not counted)."""
    meter = ActivationMeter(model)
    with meter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=False)
    gc.collect()
    reset_rss_high_water_mark()
    start = rss_high_water_mark_bytes() or 0
    F.cross_entropy(model(x), y).backward()
    peak = (rss_high_water_mark_bytes() or 0) - start
    model.zero_grad(set_to_none=False)
    return meter.last_bytes, peak


def _return_large_allocations_at_once() -> None:
    """glibc: allocations of 64 KiB and more are mapped and unmapped on free, so that the
    resident set follows the live tensors (else freed memory stays resident)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        print("(not glibc: measured peaks include freed memory kept by the allocator)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--tiny-only", action="store_true", help="skip the small ViT")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds side by side")
    parser.add_argument(
        "--only", choices=("budgets", "startup", "strategies"), help="run one section"
    )
    parser.add_argument(
        "--allocator",
        choices=("default", "release"),
        default="default",
        help="time with glibc's default allocator (as trials run) or with allocations of "
        "64 KiB and more returned to the system at once (as the peaks are measured)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.allocator == "release":
        _return_large_allocations_at_once()
    print(
        f"1 thread; step = forward + backward + AdamW step; ratios measured in this run; "
        f"allocator: {args.allocator}"
    )
    models = MODELS[:1] if args.tiny_only else MODELS
    for label, backbone, bargs, batch in models if args.only in (None, "budgets") else ():
        bench(label, backbone, bargs, batch, args.steps)
    for label, backbone, bargs, batch in models if args.only in (None, "startup") else ():
        startup(label, backbone, bargs, batch, args.steps)
    for label, backbone, bargs, batch in models if args.only in (None, "strategies") else ():
        side_by_side(label, backbone, bargs, batch, args.rounds)


if __name__ == "__main__":
    main()
