"""Class ranking of a prompted VLM: the cached prefix against a forward per class.

A tiny random VLM of each family (``workers.baselines.tiny``: 64 px images in 8 px
patches, a 4-layer language model) is asked one question about a batch of images
and every one of ``--classes`` names ("kind0 object", "kind1 object", ...) is scored as the
answer by its log-likelihood, three ways (``workers.baselines.vlm.Prompter``):

- naive: one full forward (vision tower, question, answer) per class;
- cached: the image + question prefix once, its key/value cache copied to every
  (image, class) row, which then runs only its answer tokens;
- cached + pre-filter: the same for the 10 classes whose first answer token is
  likeliest after the prefix.

Each is timed ``--repeats`` times after one warm-up, the three taking turns; the
table shows median times and the median of the per-round speed-ups, and the largest
difference between the cached and the naive scores. Ratios, not absolute times, are
the result: the machine is shared and noisy.

    .venv/bin/python benchmarks/baselines.py [--classes 100] [--images 4] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from workers.baselines import BaselineContext, tiny, vlm

QUESTION = "What is in this image? Answer with its name."


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run, ``repeats`` times, the runs taking turns (after one warm-up
    of each), so that a noisy neighbour slows them all alike."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def measure(family: str, folder: Path, classes: int, images: int, repeats: int) -> None:
    names = tuple(f"kind{k} object" for k in range(classes))  # distinct first tokens
    tiny.write_vlm(folder, family, [QUESTION, *names], image_size=64, patch_size=8, layers=4)
    ctx = BaselineContext("synthetic", torch.device("cpu"), images, "fp32", None, 0)
    model, processor = vlm.load(f"local-dir:{folder}", ctx)
    batch = list(torch.randint(0, 256, (images, 3, 64, 64), dtype=torch.uint8))

    def prompter(**config: int) -> vlm.Prompter:
        cfg = vlm.VlmPromptConfig(generation_tokens=0, **config)
        return vlm.Prompter(model, processor, names, QUESTION, cfg, (3, 64, 64))

    def cached(p: vlm.Prompter) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            prefix = p.prefix(batch)
            return p.scores(prefix, p.shortlist(prefix))

        return run

    full, filtered = prompter(), prompter(prefilter_k=10)
    error = (cached(full)() - full.naive_scores(batch)).abs().max().item()
    times = interleaved(
        {
            "naive": lambda: full.naive_scores(batch),
            "cached": cached(full),
            "top10": cached(filtered),
        },
        repeats,
    )
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    # speed-up: the median of the per-round ratios (each round ran both back to back)
    speedup = {
        name: statistics.median(n / t for n, t in zip(times["naive"], times[name], strict=True))
        for name in ("cached", "top10")
    }
    prefix_tokens = full.inputs(batch[:1])["input_ids"].shape[1]
    print(
        f"{family:9s} {prefix_tokens:6d} {ms['naive']:9.1f} {ms['cached']:9.1f} "
        f"{speedup['cached']:8.1f}x {ms['top10']:9.1f} {speedup['top10']:8.1f}x {error:10.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"{args.classes} classes, {args.images} images per batch, "
        f"{torch.get_num_threads()} CPU threads; times in ms per batch"
    )
    print(
        f"{'family':9s} {'prefix':>6s} {'naive':>9s} {'cached':>9s} {'speed-up':>9s} "
        f"{'top-10':>9s} {'speed-up':>9s} {'max |diff|':>10s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for family in tiny.VLM_FAMILIES:
            measure(family, Path(tmp) / family, args.classes, args.images, args.repeats)


if __name__ == "__main__":
    main()
