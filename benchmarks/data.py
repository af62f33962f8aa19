"""Our data pipeline against a torchvision DataLoader, and a trial's wait for its data.

1. Images/s producing the same training batches: random-resized crop (torchvision's
   scale and ratio ranges) + horizontal flip + resize to 224 px + normalise, batch 64,
   from uint8 images stored at 32 px (CIFAR-100) and at 224 px (DTD):

   - ours: ``workers.data.batches`` (whole dataset one uint8 tensor, every step a
     batched tensor op, crops as one ``grid_sample``);
   - torchvision: a ``Dataset`` returning one PIL image per item, with
     ``RandomResizedCrop(224)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``
     through a ``DataLoader`` with 0 and with 2 worker processes; its images are the
     same uint8 arrays in memory (as torchvision's CIFAR100 keeps them), or JPEG files
     of DTD's sizes opened per item (as torchvision's DTD reads them; ours are those
     decoded once, at 224 px).

   Both use the machine's cores (ours through torch's intra-op threads, torchvision's
   through its workers); the first batch is excluded. Ours also as bf16 batches, the
   ones a bf16 trial (the paper grid's precision) consumes.

2. Seconds a trial waits for a decoded dataset at its start: read from the on-disk
   decode cache (``torch.load``, warm page cache: a cold disk is slower) against mapped
   from the Ray object store, each measured inside a Ray worker process.

Ratios are the result: the machine is shared and noisy.

    .venv/bin/python benchmarks/data.py [--batches 20] [--skip-wait]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from workers.data import Augment, ImageData, batches, from_shared, to_shared

BATCH = 64
SIZE = 224
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def fake_images(n: int, side: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=gen)
    return x, torch.randint(0, 100, (n,), generator=gen)


def ours(x: torch.Tensor, y: torch.Tensor, n_batches: int, dtype: torch.dtype) -> float:
    """Images/s of our batches (of ``dtype``), first batch excluded."""
    gen = torch.Generator().manual_seed(0)
    augment = Augment(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True)
    feed = batches(
        x, y, BATCH, size=SIZE, mean=MEAN, std=STD, device=torch.device("cpu"),
        generator=gen, augment=augment, drop_last=True, dtype=dtype,
    )  # fmt: skip
    next(feed)
    start = time.perf_counter()
    done = 0
    for xb, _ in feed:
        done += len(xb)
        if done >= n_batches * BATCH:
            break
    return done / (time.perf_counter() - start)


class _PilDataset(torch.utils.data.Dataset):
    """One PIL image per item, torchvision transforms: from in-memory uint8 arrays (as
    torchvision's CIFAR100) or from JPEG files opened per item (as its DTD)."""

    def __init__(self, y: torch.Tensor, x: torch.Tensor | None, files: list[Path] | None) -> None:
        from torchvision import transforms

        self.images = x.permute(0, 2, 3, 1).contiguous().numpy() if x is not None else None
        self.files = files
        self.labels = y.numpy()
        self.transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(SIZE),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        if self.images is not None:
            image = Image.fromarray(self.images[i])
        else:
            image = Image.open(self.files[i]).convert("RGB")
        return self.transform(image), int(self.labels[i])


def torchvision_loader(dataset: _PilDataset, n_batches: int, workers: int) -> float:
    """Images/s of a torchvision DataLoader, first batch excluded."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True
    )
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    done = 0
    for xb, _ in it:
        done += len(xb)
        if done >= n_batches * BATCH:
            break
    return done / (time.perf_counter() - start)


def write_jpegs(folder: Path, n: int) -> list[Path]:
    """``n`` JPEG files of DTD's sizes (300 to 640 px a side), textured noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        w, h = rng.integers(300, 641, 2)
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((int(w), int(h)), Image.Resampling.BICUBIC)
        files.append(folder / f"{i}.jpg")
        image.save(files[-1], quality=90)
    return files


def throughput(n_batches: int) -> None:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    n = (n_batches + 2) * BATCH
    print(f"batches of {BATCH} at {SIZE} px, {n_batches} timed batches, {threads} cores")
    print(f"{'torchvision source':>34} {'ours img/s':>11} {'tv 0 workers':>13} "
          f"{'tv 2 workers':>13} {'x vs 0':>7} {'x vs 2':>7} {'ours bf16':>10} "
          f"{'x vs 2':>7}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        files = write_jpegs(Path(tmp), n)
        cases = [  # (label, our stored images, torchvision's dataset)
            ("arrays in memory, 32 px", 32, None),
            ("arrays in memory, 224 px", 224, None),
            ("JPEG files (DTD sizes)", 224, files),
        ]
        for label, side, jpegs in cases:
            x, y = fake_images(n, side)
            ours_rate = statistics.median(ours(x, y, n_batches, torch.float32) for _ in range(3))
            bf16 = statistics.median(ours(x, y, n_batches, torch.bfloat16) for _ in range(3))
            dataset = _PilDataset(y, None if jpegs else x, jpegs)
            tv0 = torchvision_loader(dataset, n_batches, 0)
            tv2 = torchvision_loader(dataset, n_batches, 2)
            print(f"{label:>34} {ours_rate:>11.0f} {tv0:>13.0f} {tv2:>13.0f} "
                  f"{ours_rate / tv0:>7.1f} {ours_rate / tv2:>7.1f} {bf16:>10.0f} "
                  f"{bf16 / tv2:>7.1f}")  # fmt: skip


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
    parser.add_argument("--batches", type=int, default=20, help="timed batches per pipeline")
    parser.add_argument("--repeats", type=int, default=5, help="Ray tasks per wait figure")
    parser.add_argument("--skip-wait", action="store_true", help="only the throughput part")
    args = parser.parse_args()
    np.random.seed(0)
    throughput(args.batches)
    if not args.skip_wait:
        data_wait(args.repeats)


if __name__ == "__main__":
    main()
