"""CPU batches reuse the memory of released batches, never of batches still held."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch

from workers.data import Augment, batches

batches_module = importlib.import_module("workers.data.batches")  # the package re-exports names

AUGMENT = Augment(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True)
CPU = torch.device("cpu")

# (stored px, output px, augmented): every way a batch is written
PATHS = [(8, 24, True), (12, 12, True), (12, 12, False), (16, 8, False)]


def _feed(side: int, size: int, augmented: bool, dtype: torch.dtype) -> Callable:
    """A fresh ``batches`` call over 22 seeded images in batches of 4 (the last of 2)."""
    x = torch.randint(0, 256, (22, 3, side, side), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(side))  # fmt: skip

    def feed() -> object:
        return batches(
            x, torch.arange(22), 4, size=size, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3),
            device=CPU, generator=torch.Generator().manual_seed(7),
            augment=AUGMENT if augmented else None, dtype=dtype,
        )  # fmt: skip

    return feed


@pytest.mark.parametrize(("side", "size", "augmented"), PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_batches_are_distinct_and_equal_released_ones_bit_for_bit(
    side: int, size: int, augmented: bool, dtype: torch.dtype
) -> None:
    feed = _feed(side, size, augmented, dtype)
    kept = [xb for xb, _ in feed()]  # every batch held: none may be written over
    released, addresses = [], set()
    for xb, _ in feed():  # each batch dropped at the next: their memory is reused
        released.append(xb.clone())
        assert xb.untyped_storage().nbytes() == xb.nbytes  # memory meters count storages
        if len(xb) == 4:  # the short last batch gets memory of its own size
            addresses.add(xb.data_ptr())
    assert len({xb.data_ptr() for xb in kept}) == len(kept) == 6
    assert len(addresses) == 2  # a loop that holds one batch needs two buffers
    assert [xb.shape[0] for xb in kept] == [4] * 5 + [2]
    for a, b in zip(kept, released, strict=True):
        assert a.dtype == dtype and a.is_contiguous() and torch.equal(a, b)


@pytest.mark.parametrize(("side", "size", "augmented"), PATHS)
def test_reuse_gives_the_bits_of_new_memory(
    side: int, size: int, augmented: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    feed = _feed(side, size, augmented, torch.float32)
    reused = [xb.clone() for xb, _ in feed()]
    monkeypatch.setattr(batches_module, "_use_count", None)  # no reuse: every batch new
    fresh = [xb.clone() for xb, _ in feed()]
    assert all(torch.equal(a, b) for a, b in zip(reused, fresh, strict=True))


HOLDERS = {
    "view": lambda xb: xb[:, :1],
    "alias": lambda xb: xb.to("cpu"),
    "numpy": lambda xb: xb.numpy(),
    # autograd keeps the input of a product with a weight that needs its gradient
    "autograd": lambda xb: xb * torch.ones(1, requires_grad=True),
}


@pytest.mark.parametrize("holder", HOLDERS)
def test_memory_held_by_anything_but_the_batch_is_not_reused(holder: str) -> None:
    feed = _feed(8, 24, True, torch.float32)
    hold, expected = HOLDERS[holder], []
    held = []
    for xb, _ in feed():
        held.append(hold(xb))
        expected.append(xb.clone())
    for keep, batch in zip(held, expected, strict=True):
        if holder == "autograd":
            keep = keep.grad_fn._saved_self  # what backward would read
        keep = torch.as_tensor(keep)
        assert torch.equal(keep, batch[:, :1] if holder == "view" else batch)


def test_a_consumer_holding_batches_gets_new_memory_beyond_the_pool() -> None:
    feed = _feed(8, 8, False, torch.float32)
    iterator = iter(feed())
    first, second, third = (next(iterator)[0] for _ in range(3))
    pooled = {first.data_ptr(), second.data_ptr(), third.data_ptr()}
    assert len(pooled) == 3
    fourth = next(iterator)[0]  # all pooled buffers held: a new one, not kept in the pool
    del first
    fifth = next(iterator)[0]  # the first batch's buffer is free again
    assert fourth.data_ptr() not in pooled and fifth.data_ptr() in pooled
