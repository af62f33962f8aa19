"""Throughput of the chunked selective scan relative to the step-by-step reference, on CPU.

A ViT-S-like sequence: 197 tokens, d_inner 768 (Vim-S's), d_state 16, inputs shaped
as a Mamba layer makes them (A = -(1..16), step sizes around softplus^-1(0.01)). For
the forward alone (inference) and for forward + backward (training), the median of
timed repeats after a warm-up, as tokens per second and as the ratio

    chunked throughput / reference throughput      (> 1: the chunked form is faster)

with the largest difference of the two outputs. Ratios are the result: the machine is
shared and noisy.

    .venv/bin/python benchmarks/scan.py [--batch 2] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from workers.mamba.scan import chunk_length, selective_scan_chunked, selective_scan_reference

LENGTH, DIM, STATE = 197, 768, 16


def inputs(batch: int, grad: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    tensors = dict(
        u=randn(batch, DIM, LENGTH),
        delta=randn(batch, DIM, LENGTH),
        A=-torch.arange(1, STATE + 1, dtype=torch.float32).repeat(DIM, 1),
        B=randn(batch, STATE, LENGTH),
        C=randn(batch, STATE, LENGTH),
        D=torch.ones(DIM),
        z=randn(batch, DIM, LENGTH),
        delta_bias=-4.6 + 0.5 * randn(DIM),
    )
    return {k: v.requires_grad_(grad) for k, v in tensors.items()}


def seconds(scan: Callable[..., torch.Tensor], batch: int, train: bool, repeats: int) -> float:
    """Median seconds of one call (forward, or forward + backward), warm-up excluded."""
    args = inputs(batch, grad=train)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        if train:
            scan(**args, delta_softplus=True).sum().backward()
        else:
            with torch.no_grad():
                scan(**args, delta_softplus=True)
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)

    args = inputs(opts.batch, grad=False)
    with torch.no_grad():
        error = (
            selective_scan_chunked(**args, delta_softplus=True)
            - selective_scan_reference(**args, delta_softplus=True)
        ).abs()
    delta = torch.nn.functional.softplus(args["delta"] + args["delta_bias"][:, None])
    print(
        f"selective scan on CPU ({opts.threads} threads): batch {opts.batch}, {LENGTH} tokens, "
        f"d_inner {DIM}, d_state {STATE}; chunk length {chunk_length(delta, args['A'])}; "
        f"max |chunked - reference| {error.max():.2e}"
    )
    tokens = opts.batch * LENGTH
    for train in (False, True):
        reference = seconds(selective_scan_reference, opts.batch, train, opts.repeats)
        chunked = seconds(selective_scan_chunked, opts.batch, train, opts.repeats)
        print(
            f"{'forward + backward' if train else 'forward':<20} reference "
            f"{tokens / reference:10.0f} tokens/s   chunked {tokens / chunked:10.0f} tokens/s   "
            f"ratio {reference / chunked:6.2f}x"
        )


if __name__ == "__main__":
    main()
