"""Our data pipeline against the best torchvision set-up, and a trial's wait for its data.

1. Images/s producing the same training batches: batch 64, random-resized crop
   (torchvision's scale and ratio ranges) + horizontal flip + resize + normalise, in
   the compute dtype (fp32 or bf16), from uint8 images stored at 32 px (CIFAR) and at
   224 px (DTD decoded), to 32 px (the shipped grids) and to 224 px:

   - ours: ``workers.data.batches`` (the whole dataset one uint8 tensor, every step a
     batched tensor op), in the main process, by its ``cpu_count`` intra-op threads (on
     the CPU each batch into the buffer of an earlier one that nothing holds any more);
     beside it, for context, the same on one thread (``ours 1t``);
   - torchvision: a ``DataLoader`` (shuffled, 0, 2 and cpu_count worker processes,
     pinned memory when a GPU takes the batches) over the same uint8 images, per item
     either PIL (``RandomResizedCrop``, ``RandomHorizontalFlip``, ``ToTensor``,
     ``Normalize``) or ``transforms.v2`` on uint8 tensors (the same, bilinear without
     antialiasing as ours, ``ToDtype``), cast to the compute dtype in the worker;
     without workers the transforms run on the ``cpu_count`` threads, as ours.

   The best peer of each row is the arm with the highest median; the ratio is ours
   over it, median (and range) of the repeats, every arm of a repeat run back to back
   in this process. The first batch of every arm (worker start-up) is excluded. With a
   GPU (``--device cuda``) ours runs there on resident data and every peer batch is
   copied to it. Last, the ceilings of a one-thread pipeline: an fp32 224 px batch only
   filled, into new memory (page faults and the kernel's zero-fill included) and into
   one reused buffer.

2. Seconds a trial waits for a decoded dataset at its start: read from the on-disk
   decode cache (``torch.load``, warm page cache: a cold disk is slower) against mapped
   from the Ray object store, each measured inside a Ray worker process.

Ratios are the result: the machine is shared and noisy.

    .venv/bin/python benchmarks/data.py [--batches 12] [--repeats 3] [--skip-wait]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from workers.data import Augment, ImageData, batches, from_shared, to_shared

BATCH = 64
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop defaults
CASES = ((32, 32), (32, 224), (224, 224))  # (stored px, output px)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fake_images(n: int, side: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=gen)
    return x, torch.randint(0, 100, (n,), generator=gen)


def _rate(feed: Iterable, n_batches: int, device: torch.device) -> float:
    """Images/s of ``feed`` on ``device``, its first batch excluded."""
    it = iter(feed)
    next(it)
    done = 0
    start = time.perf_counter()
    for xb, _ in it:
        xb = xb.to(device, non_blocking=True)
        done += len(xb)
        if done >= n_batches * BATCH:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done / (time.perf_counter() - start)


def ours(x: torch.Tensor, y: torch.Tensor, size: int, dtype: torch.dtype, n_batches: int,
         device: torch.device, threads: int | None = None) -> float:  # fmt: skip
    """Images/s of our augmented batches (on ``threads`` intra-op threads if given)."""
    feed = batches(
        x, y, BATCH, size=size, mean=MEAN, std=STD, device=device,
        generator=torch.Generator().manual_seed(0), augment=Augment(SCALE, RATIO, True),
        drop_last=True, dtype=dtype,
    )  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _rate(feed, n_batches, device)
    finally:
        torch.set_num_threads(before)


class _Cast:
    """A transform casting a tensor to ``dtype`` (a class: workers may pickle it)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype)


class _Items(torch.utils.data.Dataset):
    """One transformed image per item from in-memory uint8 images (as torchvision's
    CIFAR100 keeps them): a PIL image, or a uint8 CHW tensor for ``transforms.v2``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int, dtype: torch.dtype,
                 kind: str) -> None:  # fmt: skip
        from torchvision import transforms
        from torchvision.transforms import v2

        self.kind, self.labels = kind, y.numpy()
        if kind == "pil":
            self.images = x.permute(0, 2, 3, 1).contiguous().numpy()
            self.transform = transforms.Compose([
                transforms.RandomResizedCrop(size, SCALE, RATIO),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
                _Cast(dtype),
            ])  # fmt: skip
        else:
            self.images = x
            self.transform = v2.Compose([
                v2.RandomResizedCrop(size, SCALE, RATIO, antialias=False),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(MEAN, STD),
                v2.ToDtype(dtype),
            ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        if self.kind == "pil":
            from PIL import Image

            image = Image.fromarray(image)
        return self.transform(image), int(self.labels[i])


def peer_arms(device: torch.device) -> list[tuple[str, str, int, bool]]:
    """(label, item kind, workers, pinned) of every torchvision set-up measured."""
    pins = (False, True) if device.type == "cuda" else (False,)
    return [
        (f"{kind} {w}w{' pin' if pin else ''}", kind, w, pin)
        for kind in ("pil", "v2")
        for w in sorted({0, 2, os.cpu_count() or 1})
        for pin in pins
    ]


def peer(dataset: _Items, workers: int, pin: bool, n_batches: int, device: torch.device) -> float:
    """Images/s of a torchvision DataLoader. Without workers its per-image transforms run
    here on this process's threads (each worker runs one thread, as PyTorch sets it)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True,
        pin_memory=pin,
    )  # fmt: skip
    return _rate(loader, n_batches, device)


def throughput(n_batches: int, repeats: int, device: torch.device) -> None:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    n = (n_batches + 6) * BATCH  # prefetching workers draw a few batches more
    arms = peer_arms(device)
    rates: dict[tuple, list[float]] = {}
    stored = {side: fake_images(n, side) for side in {side for side, _ in CASES}}
    for _ in range(repeats):  # every arm once per repeat: load drifts hit all alike
        for side, size in CASES:
            x, y = stored[side]
            for name, dtype in DTYPES.items():
                row = (side, size, name)
                resident = x.to(device)
                rates.setdefault(row + ("ours",), []).append(
                    ours(resident, y, size, dtype, n_batches, device)
                )
                rates.setdefault(row + ("ours 1t",), []).append(
                    ours(resident, y, size, dtype, n_batches, device, threads=1)
                )
                for label, kind, workers, pin in arms:
                    dataset = _Items(x, y, size, dtype, kind)
                    rates.setdefault(row + (label,), []).append(
                        peer(dataset, workers, pin, n_batches, device)
                    )
        for reuse in (False, True):
            rates.setdefault(("fill", reuse), []).append(fills(n_batches, device, reuse))
    _print_table(rates, [label for label, *_ in arms], n_batches, repeats, threads, device)
    new, reused = (statistics.median(rates[("fill", reuse)]) for reuse in (False, True))
    print(f"an fp32 batch at 224 px ({BATCH * 3 * 224 * 224 * 4 / 1e6:.1f} MB) only written "
          f"once, one thread: {new:.0f} images/s into new memory, {reused:.0f} into a reused "
          "buffer (the ceilings of a one-thread pipeline)")  # fmt: skip


def fills(n_batches: int, device: torch.device, reuse: bool) -> float:
    """Images/s of only filling fp32 224 px batches on one thread: each a new tensor
    (first-touch page faults included) or the same buffer again."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    buffer = torch.empty(BATCH, 3, 224, 224, device=device).fill_(0.0)
    start = time.perf_counter()
    for _ in range(n_batches):
        (buffer if reuse else torch.empty_like(buffer)).fill_(0.5)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    torch.set_num_threads(threads)
    return n_batches * BATCH / (time.perf_counter() - start)


def _print_table(rates: dict[tuple, list[float]], labels: list[str], n_batches: int,
                 repeats: int, threads: int, device: torch.device) -> None:  # fmt: skip
    def med(key: tuple) -> float:
        return statistics.median(rates[key])

    print(f"batches of {BATCH}, {n_batches} timed per arm, median of {repeats} repeats, "
          f"{threads} cores and threads, ours on {device}; images/s")  # fmt: skip
    print("| stored -> out | dtype | ours | ours 1t | "
          + " | ".join(f"tv {lb}" for lb in labels)
          + " | best peer | ours / best (range) |")  # fmt: skip
    print("|---|---|" + "---:|" * (len(labels) + 2) + "---|---:|")
    for side, size in CASES:
        for name in DTYPES:
            row = (side, size, name)
            best = max(labels, key=lambda lb: med(row + (lb,)))
            ratios = [
                a / b for a, b in zip(rates[row + ("ours",)], rates[row + (best,)], strict=True)
            ]
            cells = " | ".join(f"{med(row + (lb,)):.0f}" for lb in labels)
            print(f"| {side} -> {size} | {name} | {med(row + ('ours',)):.0f} | "
                  f"{med(row + ('ours 1t',)):.0f} | {cells} | "
                  f"{best} | {statistics.median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) |")  # fmt: skip


# --------------------------------------------------------------------------- data wait


def wait_times(n: int, side: int, repeats: int) -> tuple[float, float]:
    """Median seconds to get the dataset in a Ray worker: disk cache vs object store."""
    import ray

    x, y = fake_images(n, side)
    data = ImageData(x, y, x[:100], y[:100], 100, MEAN, STD)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "decoded.pt"
        torch.save({"train_x": data.train_x, "train_y": data.train_y}, path)
        ref = ray.put(to_shared(data))

        @ray.remote(num_cpus=1)
        def from_disk() -> float:
            start = time.perf_counter()
            state = torch.load(path, map_location="cpu", weights_only=True)
            assert state["train_x"].shape == (n, 3, side, side)
            return time.perf_counter() - start

        @ray.remote(num_cpus=1)
        def from_store(refs: list) -> float:
            start = time.perf_counter()
            shared = from_shared(ray.get(refs[0]))
            assert shared.train_x.shape == (n, 3, side, side)
            return time.perf_counter() - start

        disk = statistics.median(ray.get([from_disk.remote() for _ in range(repeats)]))
        store = statistics.median(ray.get([from_store.remote([ref]) for _ in range(repeats)]))
    return disk, store


def data_wait(repeats: int) -> None:
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=2)
    print("\nwait for the decoded dataset at trial start (median of", repeats, "Ray tasks)")
    print(f"{'dataset':>24} {'MiB':>6} {'disk cache s':>13} {'object store s':>15} {'x':>7}")
    for label, n, side in (("CIFAR-100 train, 32 px", 50_000, 32), ("DTD, 224 px", 5_640, 224)):
        disk, store = wait_times(n, side, repeats)
        mib = n * 3 * side * side / 2**20
        print(f"{label:>24} {mib:>6.0f} {disk:>13.3f} {store:>15.4f} {disk / store:>7.0f}")
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=12, help="timed batches per arm")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every arm")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where our batches are made and every batch ends (cpu | cuda)",
    )
    parser.add_argument("--wait-repeats", type=int, default=5, help="Ray tasks per wait figure")
    parser.add_argument("--skip-wait", action="store_true", help="only the throughput part")
    args = parser.parse_args()
    np.random.seed(0)
    throughput(args.batches, args.repeats, torch.device(args.device))
    if not args.skip_wait:
        data_wait(args.wait_repeats)


if __name__ == "__main__":
    main()
