"""Bilinear resampling of a batch, each image by its own axis-aligned affine map.

``resample`` computes what ``F.grid_sample`` (bilinear, border padding,
``align_corners=False``) computes for maps without rotation (crops, flips, resizes),
separably: a vertical pass makes each image's output rows, then one batched matmul per
chunk of images with a (W, size) interpolation matrix writes the output directly in
the compute dtype (a bf16 batch from bf16 matmuls). On the CPU, images go through in
chunks whose rows stay in cache, and a large image's matmul reads only the columns its
crop spans (in fp32, in bands of output columns, each reading only the columns under
it). The output may be a given tensor (``out=``): ``batches`` reuses its buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger(__name__)

_CHUNK = 1 << 18  # elements of output rows per chunk on the CPU: 1 MiB of fp32, in L2
# output columns per matmul of one large image: a band reads only the ~_BAND input
# columns under it, where a whole row's matmul would multiply all the others by zero
_BAND = 32


def resample(
    x: torch.Tensor,
    theta: torch.Tensor,
    size: int,
    dtype: torch.dtype = torch.float32,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bilinear samples of ``x`` (B, C, H, W; uint8 or float) at ``size`` x ``size``
    points mapped by the axis-aligned affine maps ``theta`` (B, 2, 3) from output to input
    coordinates in [-1, 1], times ``scale`` plus ``shift`` (per channel, (1, C, 1, 1)),
    as ``dtype``; written into ``out`` (contiguous, (B, C, size, size), ``dtype``) when
    given, else into a new tensor.

    >>> theta = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])  # the whole image
    >>> resample(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), theta, 224).shape
    torch.Size([1, 3, 224, 224])
    """
    n, channels, height, width = x.shape
    scale = torch.ones(1, channels, 1, 1, device=x.device) if scale is None else scale
    shift = torch.zeros_like(scale) if shift is None else shift
    down = _positions(theta[:, 1, 1], theta[:, 1, 2], height, size)
    across = _positions(theta[:, 0, 0], theta[:, 0, 2], width, size)
    rows = _vertical(x, down, dtype, scale, shift)
    shape = (n, channels, size, size)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=x.device)
    elif (out.shape, out.dtype, out.device) != (shape, dtype, x.device) or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} {shape} on {x.device}, "
            f"got a {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    flat = out.view(n, channels * size, size)
    for part, start, stop in _chunks(across, x.device, channels * size * width, width):
        cols = _weights(across[part], start, stop).to(dtype)
        chunk_rows = rows(part, start, stop)
        for a, b, lo, hi in _bands(across[part], start, stop, dtype):
            torch.bmm(chunk_rows[..., lo:hi], cols[:, lo:hi, a:b], out=flat[part, :, a:b])
    return out


def _chunks(
    across: torch.Tensor, device: torch.device, per_image: int, width: int
) -> Iterator[tuple[slice, int, int]]:
    """Chunks of images, each with the span of input columns its outputs read (positions
    ``across``, (B, size)). On the CPU several small images go whole, or one large image
    with only its crop's columns (an average crop leaves ~30 % of them out, which its
    matmul then skips); on a GPU the whole batch at once."""
    n = len(across)
    step = n if device.type != "cpu" else max(1, _CHUNK // per_image)
    if step > 1:
        yield from ((slice(i, min(i + step, n)), 0, width) for i in range(0, n, step))
        return
    first = across.amin(1).floor()
    last = (across.amax(1).floor() + 1).clamp(max=width - 1)
    for i, (start, stop) in enumerate(torch.stack([first, last + 1], 1).long().tolist()):
        yield slice(i, i + 1), start, stop


def _bands(
    across: torch.Tensor, start: int, stop: int, dtype: torch.dtype
) -> list[tuple[int, int, int, int]]:
    """The matmuls that write a chunk (positions ``across``, (b, size), reading input
    columns ``start:stop``): (first, end) output column and (first, end) input column
    counted from ``start``. One image in fp32 goes in bands of ``_BAND`` output columns,
    each reading the columns of its two-tap tents only; several images, or bf16 (whose
    whole-row matmul the CPU's bf16 matrix units make cheaper than its bands), in one
    matmul, as on a GPU. The same sums: the columns left out have zero weights (the same
    bits where the CPU's matmul adds in the same order whatever its width, else the last
    bit of a few outputs)."""
    n, size = across.shape
    if n > 1 or size <= _BAND or dtype != torch.float32 or across.device.type != "cpu":
        return [(0, size, 0, stop - start)]
    taps = across[0].floor()
    padded = torch.cat([taps, taps[-1:].expand(-size % _BAND)]).view(-1, _BAND)
    lows, highs = padded.amin(1).long().tolist(), padded.amax(1).long().tolist()
    return [
        (a, min(a + _BAND, size), lo - start, min(high + 2, stop) - start)
        for a, lo, high in zip(range(0, size, _BAND), lows, highs, strict=True)
    ]


def _vertical(
    x: torch.Tensor,
    down: torch.Tensor,
    dtype: torch.dtype,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> Callable[[slice, int, int], torch.Tensor]:
    """The vertical pass (input rows at positions ``down``, (B, size)) for a chunk of
    images and a span of columns: their (b, C * size, span) normalised output rows in
    ``dtype``. From a small image enlarged (CIFAR's 32 px to 224) a matmul with a
    (size, H) interpolation matrix on the normalised image costs least; otherwise each
    output row blends the two input rows either side, gathered whole (as bytes from a
    uint8 batch)."""
    channels, height = x.shape[1:3]
    size = down.shape[1]
    if 3 * height <= size:
        x = torch.addcmul(shift, x.float(), scale).to(dtype)
        matrix = _weights(down, 0, height).transpose(1, 2).to(dtype)
        return lambda part, a, b: (matrix[part, None] @ x[part, ..., a:b]).flatten(1, 2)
    lo = down.floor()
    weight = scale * (down - lo)[:, None, :, None]  # (B, C, size, 1): normalisation folded in
    keep = scale - weight
    top = _row_numbers(x, lo.long())
    bottom = _row_numbers(x, (lo + 1).clamp_(max=height - 1).long())
    flat = x.reshape(-1, x.shape[-1])  # every row of every image and channel

    def blend(part: slice, a: int, b: int) -> torch.Tensor:
        upper, lower = (
            flat[:, a:b].index_select(0, r[part].flatten()).view(-1, channels, size, b - a)
            for r in (top, bottom)
        )
        rows = torch.addcmul(shift, upper.float(), keep[part])
        return rows.addcmul_(lower.float(), weight[part]).to(dtype).flatten(1, 2)

    return blend


def _row_numbers(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, C, n_out): the numbers of rows ``index`` (B, n_out) of each image and channel
    among all the rows of ``x`` (B, C, H, W)."""
    n, channels, height, _ = x.shape
    first = (torch.arange(n * channels, device=x.device) * height).view(n, channels, 1)
    return first + index[:, None]


def _positions(scale: torch.Tensor, offset: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """(B, n_out) input positions, in pixels and clamped to the image (border padding), of
    the output pixel centres mapped by ``u -> scale * u + offset`` in [-1, 1] coordinates
    (``align_corners=False``)."""
    u = (2 * torch.arange(n_out, device=scale.device, dtype=scale.dtype) + 1) / n_out - 1
    pos = (((scale[:, None] * u + offset[:, None]) + 1) * n_in - 1) / 2
    return pos.clamp(0, n_in - 1)


def _weights(pos: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """(B, stop - start, n_out) bilinear weights of input pixels ``start:stop`` for output
    pixels at input positions ``pos`` (B, n_out): the tent ``max(0, 1 - |pos - i|)``."""
    i = torch.arange(start, stop, device=pos.device, dtype=pos.dtype)[:, None]
    return (1 - (pos[:, None, :] - i).abs()).clamp_(min=0)
