"""Separable resampling: the same pixels as ``grid_sample``; batches keep their contract."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from workers.data import Augment, batches, crop_transforms, resample

resampling = importlib.import_module("workers.data.resample")  # the package re-exports names

AUGMENT = Augment(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True)
CPU = torch.device("cpu")
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grid_sample(x: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """The reference: bilinear, border padding, align_corners=False."""
    grid = F.affine_grid(theta, [len(x), x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _images_and_crops(n: int, side: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random uint8 images of ``side`` px and a random crop map for each."""
    x = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=gen)
    return x, crop_transforms(n, AUGMENT, gen)


@pytest.mark.parametrize(
    ("side", "size", "chunk"),
    [
        (8, 24, None),  # small image enlarged: vertical pass by matmul
        (16, 16, None),  # same size: vertical pass by row blends, images in chunks
        (24, 10, None),  # shrunk
        (20, 20, 1),  # one image per chunk: only the columns each crop spans
        (7, 40, 1),  # matmul branch, one image per chunk
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resample_equals_grid_sample_on_normalised_images(
    side: int, size: int, chunk: int | None, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunk is not None:
        monkeypatch.setattr(resampling, "_CHUNK", chunk)
    gen = torch.Generator().manual_seed(side * size)
    x, theta = _images_and_crops(9, side, gen)
    scale = torch.rand(1, 3, 1, 1, generator=gen) / 60
    shift = torch.rand(1, 3, 1, 1, generator=gen) - 2
    out = resample(x, theta, size, dtype, scale, shift)
    expected = _grid_sample(x.float() * scale + shift, theta, size)
    assert out.dtype == dtype and out.shape == (9, 3, size, size) and out.is_contiguous()
    # fp32: float rounding (values up to ~4); bf16: its 8-bit mantissa
    tolerance = 1e-4 if dtype == torch.float32 else 0.04
    assert (out.float() - expected).abs().max() < tolerance


@pytest.mark.parametrize(("side", "size", "chunk"), [(8, 24, None), (16, 16, None), (20, 20, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resample_into_a_given_tensor_writes_the_same_bits(
    side: int, size: int, chunk: int | None, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunk is not None:
        monkeypatch.setattr(resampling, "_CHUNK", chunk)
    gen = torch.Generator().manual_seed(side)
    x, theta = _images_and_crops(5, side, gen)
    out = torch.full((5, 3, size, size), float("nan"), dtype=dtype)  # stale contents
    written = resample(x, theta, size, dtype, out=out)
    assert written is out and torch.equal(out, resample(x, theta, size, dtype))


@pytest.mark.parametrize(
    "out",
    [
        torch.empty(5, 3, 12, 12, dtype=torch.bfloat16),  # another dtype
        torch.empty(4, 3, 12, 12),  # another batch
        torch.empty(5, 3, 12, 12).transpose(2, 3),  # not contiguous
    ],
)
def test_resample_refuses_an_unfit_tensor_to_write_into(out: torch.Tensor) -> None:
    theta = crop_transforms(5, AUGMENT, torch.Generator().manual_seed(0))
    with pytest.raises(
        ValueError, match=r"out must be a contiguous torch.float32 \(5, 3, 12, 12\)"
    ):
        resample(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), theta, 12, out=out)


def test_whole_image_map_is_interpolate() -> None:
    x = torch.rand(4, 3, 13, 13) * 255
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(4, 2, 3)
    for size in (40, 13, 6):
        expected = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        assert torch.allclose(resample(x, identity, size), expected, atol=1e-3)


def test_chunks_cover_the_batch_and_the_columns_each_crop_reads() -> None:
    theta = crop_transforms(5, AUGMENT, torch.Generator().manual_seed(0))
    across = resampling._positions(theta[:, 0, 0], theta[:, 0, 2], 224, 224)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    whole = list(resampling._chunks(across, cpu, 3 * 224 * 8, 8))
    assert whole == [(slice(0, 5), 0, 8)]  # small images: one chunk, every column
    assert list(resampling._chunks(across, cuda, 3 * 224 * 224, 224)) == [(slice(0, 5), 0, 224)]
    spans = list(resampling._chunks(across, cpu, 3 * 224 * 224, 224))
    assert [part for part, _, _ in spans] == [slice(i, i + 1) for i in range(5)]
    for (_, start, stop), pos in zip(spans, across, strict=True):
        # the span holds both taps of every output pixel, and nothing else
        assert start == int(pos.min().floor()) and stop == min(int(pos.max().floor()) + 2, 224)
    assert sum(stop - start for _, start, stop in spans) < 5 * 224  # crops skip columns


@pytest.mark.parametrize(("side", "size"), [(224, 224), (64, 100), (50, 37)])
def test_bands_of_columns_write_one_matmul_per_image_to_its_rounding(
    side: int, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The columns a band leaves out have zero weights, so it adds the same products: the
    same bits where the CPU's matmul adds in the same order whatever the matrices' width
    (the machines of earlier runs), the last bit of 0.06-3 % of the outputs on others (an
    AMD EPYC). A band reading wrong columns or missing a tap errs by ~0.1-1."""
    dtype = torch.float32  # bf16 images go in one matmul
    monkeypatch.setattr(resampling, "_CHUNK", 1)  # one image per chunk: its columns in bands
    gen = torch.Generator().manual_seed(size)
    x, theta = _images_and_crops(6, side, gen)
    scale, shift = torch.full((1, 3, 1, 1), 1 / 60), torch.full((1, 3, 1, 1), -2.0)
    banded = resample(x, theta, size, dtype, scale, shift)
    monkeypatch.setattr(resampling, "_BAND", size)  # a whole row of outputs per matmul
    whole = resample(x, theta, size, dtype, scale, shift)
    last_bits = 2 * torch.finfo(dtype).eps * whole.abs().max()
    torch.testing.assert_close(banded, whole, rtol=0, atol=float(last_bits))


def test_bands_cover_the_outputs_and_read_both_taps_of_each() -> None:
    theta = crop_transforms(20, AUGMENT, torch.Generator().manual_seed(1))
    across = resampling._positions(theta[:, 0, 0], theta[:, 0, 2], 150, 100)
    chunks = resampling._chunks(across, CPU, 10**6, 150)  # one image each
    for pos, (_, start, stop) in zip(across, chunks, strict=True):
        bands = resampling._bands(pos[None], start, stop, torch.float32)
        assert [a for a, *_ in bands] == list(range(0, 100, resampling._BAND))
        assert [b for _, b, *_ in bands] == [*range(resampling._BAND, 100, resampling._BAND), 100]
        for a, b, lo, hi in bands:
            left = pos[a:b].floor().long() - start  # each output's left tap, from the span
            right = (left + 1).clamp(max=stop - start - 1)
            assert lo == left.min() and right.max() < hi <= left.max() + 2  # both, no more
    whole = [(0, 100, 0, 150)]
    assert resampling._bands(across[:2], 0, 150, torch.float32) == whole  # several images
    assert resampling._bands(across[:1], 0, 150, torch.bfloat16) == whole
    assert resampling._bands(across[:1].to("meta"), 0, 150, torch.float32) == whole  # a GPU's


# --------------------------------------------------------------------------- batches


def _normalised(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


@pytest.mark.parametrize(("side", "size"), [(8, 32), (16, 16), (24, 12)])
def test_augmented_batches_are_the_seeded_crops_of_the_normalised_images(
    side: int, size: int
) -> None:
    # the contract the sweep's results rest on: for a seed, the shuffle and the crop maps
    # drawn from it, sampled bilinearly from the normalised image (as grid_sample would)
    x = torch.randint(0, 256, (20, 3, side, side), dtype=torch.uint8)
    y = torch.arange(20)
    feed = batches(
        x, y, 8, size=size, mean=MEAN, std=STD, device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(4), augment=AUGMENT,
    )  # fmt: skip
    replay = torch.Generator().manual_seed(4)
    order = torch.randperm(20, generator=replay)
    for start, (xb, yb) in zip(range(0, 20, 8), feed, strict=True):
        idx = order[start : start + 8]
        theta = crop_transforms(len(idx), AUGMENT, replay)
        assert torch.equal(yb, y[idx])
        assert (xb - _grid_sample(_normalised(x[idx]), theta, size)).abs().max() < 1e-4


def test_plain_batches_are_interpolated_normalised_images() -> None:
    x = torch.randint(0, 256, (6, 3, 9, 9), dtype=torch.uint8)
    for size in (9, 27, 5):
        xb, _ = next(
            batches(x, torch.arange(6), 6, size=size, mean=MEAN, std=STD,
                    device=torch.device("cpu"))
        )  # fmt: skip
        expected = F.interpolate(_normalised(x), size=(size, size), mode="bilinear")
        assert torch.allclose(xb, expected, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("side", "size"), [(224, 224), (224, 32), (32, 224)])
def test_batches_are_the_same_bits_on_one_thread_and_on_two(
    dtype: torch.dtype, side: int, size: int
) -> None:
    """A trial's batches do not depend on how many CPUs it was given."""
    x = torch.randint(0, 256, (16, 3, side, side), dtype=torch.uint8, generator=_gen(1))
    made = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            feed = batches(
                x, torch.arange(16), 8, size=size, mean=MEAN, std=STD, dtype=dtype,
                device=CPU, generator=_gen(0), augment=AUGMENT,
            )  # fmt: skip
            made.append([xb.clone() for xb, _ in feed])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*made, strict=True))


def test_batches_are_made_by_the_callers_threads() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    real = resampling.resample

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    try:
        batches_module = importlib.import_module("workers.data.batches")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(batches_module, "resample", spy)
            x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
            for _ in batches(
                x, torch.arange(8), 4, size=16, mean=MEAN, std=STD,
                device=torch.device("cpu"), generator=torch.Generator(), augment=AUGMENT,
            ):  # fmt: skip
                assert torch.get_num_threads() == 2  # the trial's step keeps its threads
        assert seen == [2, 2]  # a trial's CPUs make its batches (one: 1.1-1.8x slower)
    finally:
        torch.set_num_threads(threads)
