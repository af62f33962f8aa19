"""Checkpoint planning: exact against brute force, monotone in the budget, fast enough."""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable
from functools import cache

import pytest

from workers.checkpoint_plan import (
    BlockCost,
    Infeasible,
    Option,
    Plan,
    min_peak,
    peak_of,
    plan,
    revolve_forward_steps,
)

# ---------------------------------------------------------------- helpers


def random_blocks(rng: random.Random, n: int, integer_times: bool) -> list[BlockCost]:
    """Small byte counts so that many assignments tie; integer times make ties exact."""
    blocks = []
    for i in range(n):
        full = rng.randint(1, 60)
        given = rng.randint(0, full // 2)  # the block input
        cost = rng.randint(1, 4) if integer_times else rng.uniform(0.1, 2.0)
        options = [
            Option("save", full, full + rng.randint(0, 8)),
            Option("recompute", given, full + given + rng.randint(0, 8), cost),
        ]
        if rng.random() < 0.6:
            part = rng.randint(given, full)
            share = rng.randint(0, 2) if integer_times else rng.uniform(0.0, 1.0) * cost
            options.append(Option("selective", part, full + rng.randint(0, 8), share))
        rng.shuffle(options)  # option order must not matter
        blocks.append(BlockCost(f"blocks.{i}", tuple(options)))
    return blocks


def independent_peak(blocks: list[BlockCost], options: tuple[Option, ...]) -> int:
    """The memory model written out term by term, independently of the module."""
    terms = [sum(o.kept_bytes for o in options)]
    for i, option in enumerate(options):
        terms.append(sum(o.kept_bytes for o in options[:i]) + option.peak_bytes)
    return max(terms)


def all_assignments(blocks: list[BlockCost]) -> list[tuple[float, int, int]]:
    """(time, peak, recomputing blocks) of every assignment of options."""
    rows = []
    for options in itertools.product(*(b.options for b in blocks)):
        seconds = sum((o.recompute_s for o in options), 0.0)
        recomputing = sum(o.recompute_s > 0 for o in options)
        rows.append((seconds, independent_peak(blocks, options), recomputing))
    return rows


def plan_key(blocks: list[BlockCost], result: Plan) -> tuple[float, int, int]:
    options = [b.option(k) for b, k in zip(blocks, result.choices, strict=True)]
    return (
        sum((o.recompute_s for o in options), 0.0),
        independent_peak(blocks, tuple(options)),
        sum(o.recompute_s > 0 for o in options),
    )


def uniform_blocks(n: int) -> list[BlockCost]:
    """Identical blocks: recomputing any m of them frees 90 bytes each, 1 s each."""
    options = (Option("save", 100, 100), Option("recompute", 10, 110, 1.0))
    return [BlockCost(f"blocks.{i}", options) for i in range(n)]


def large_random_blocks(seed: int, n: int = 100) -> list[BlockCost]:
    """Profiler-like magnitudes: tens of MB per block, recompute in milliseconds."""
    rng = random.Random(seed)
    blocks = []
    for i in range(n):
        full = rng.randint(10, 200) * 1_000_003 + rng.randint(0, 999)
        given = full // 10
        seconds = rng.uniform(0.005, 0.05)
        blocks.append(
            BlockCost(
                f"blocks.{i}",
                (
                    Option("save", full, full),
                    Option(
                        "selective",
                        int(given + (full - given) * rng.uniform(0.2, 0.6)),
                        full,
                        seconds * rng.uniform(0.1, 0.4),
                    ),
                    Option("recompute", given, full + given // 2, seconds),
                ),
            )
        )
    return blocks


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("integer_times", [True, False])
def test_plan_matches_brute_force(integer_times: bool) -> None:
    rng = random.Random(1234 + integer_times)
    checked = infeasible = 0
    for _ in range(300):
        blocks = random_blocks(rng, rng.randint(1, 7), integer_times)
        rows = all_assignments(blocks)
        lowest = min(peak for _, peak, _ in rows)
        highest = max(peak for _, peak, _ in rows)
        budgets = {lowest - 1, lowest, highest, highest + 50}
        budgets |= {rng.randint(lowest, highest) for _ in range(4)}
        for budget in sorted(budgets):
            fitting = [row for row in rows if row[1] <= budget]
            if not fitting:
                with pytest.raises(Infeasible) as err:
                    plan(blocks, budget)
                assert err.value.min_peak_bytes == lowest
                infeasible += 1
                continue
            result = plan(blocks, budget)
            best = min(fitting)  # least time, then lowest peak, then fewest recomputing
            key = plan_key(blocks, result)
            assert key[1] <= budget
            assert result.peak_bytes == key[1]
            assert result.recompute_s == pytest.approx(key[0], abs=1e-12)
            if integer_times:  # sums are exact: the tie-breaks must match too
                assert key == best
            else:
                assert key[0] == pytest.approx(best[0], rel=1e-12, abs=1e-12)
            checked += 1
    assert checked > 1000 and infeasible > 200


def test_min_peak_matches_brute_force() -> None:
    rng = random.Random(7)
    for _ in range(200):
        blocks = random_blocks(rng, rng.randint(1, 6), integer_times=True)
        assert min_peak(blocks) == min(peak for _, peak, _ in all_assignments(blocks))


def test_peak_of_matches_the_model() -> None:
    rng = random.Random(3)
    for _ in range(50):
        blocks = random_blocks(rng, rng.randint(1, 6), integer_times=True)
        options = tuple(rng.choice(b.options) for b in blocks)
        assert peak_of(blocks, [o.kind for o in options]) == independent_peak(blocks, options)


def test_uniform_chain_needs_exactly_enough_recomputes() -> None:
    # Every recompute frees 90 bytes of the final sum 100 n, so the least time is
    # ceil((100 n - budget) / 90) recomputes; any placement of them reaches that peak.
    n, budget = 100, 6000
    result = plan(uniform_blocks(n), budget)
    needed = math.ceil((100 * n - budget) / 90)
    assert result.recompute_s == needed
    assert len(result.blocks("recompute")) == needed
    assert result.peak_bytes == 100 * n - 90 * needed <= budget


def test_unconstrained_budget_saves_everything() -> None:
    rng = random.Random(11)
    for _ in range(20):
        blocks = random_blocks(rng, rng.randint(1, 7), integer_times=False)
        everything = [b.option("save") for b in blocks]
        result = plan(blocks, independent_peak(blocks, tuple(everything)))
        assert result.choices == ("save",) * len(blocks)
        assert result.recompute_s == 0.0
        assert result.blocks("recompute") == ()
    assert plan(large_random_blocks(0), math.inf).choices == ("save",) * 100


def test_infeasible_reports_the_smallest_peak() -> None:
    blocks = uniform_blocks(5)
    lowest = min_peak(blocks)
    assert lowest == min(peak for _, peak, _ in all_assignments(blocks))
    with pytest.raises(Infeasible, match=f"smallest achievable peak {lowest} bytes") as err:
        plan(blocks, lowest - 1)
    assert err.value.min_peak_bytes == lowest
    assert err.value.budget_bytes == lowest - 1
    assert plan(blocks, lowest).peak_bytes == lowest
    with pytest.raises(Infeasible):
        plan(blocks, -1)


def test_empty_chain() -> None:
    assert plan([], 0) == Plan(names=(), choices=(), peak_bytes=0, recompute_s=0.0)
    assert min_peak([]) == 0


def test_recompute_time_never_grows_with_the_budget() -> None:
    for seed in range(3):
        blocks = large_random_blocks(seed, n=30)
        lowest = min_peak(blocks)
        highest = peak_of(blocks, ["save"] * len(blocks))
        previous = math.inf
        for step in range(25):
            budget = lowest + (highest - lowest) * step // 24
            result = plan(blocks, budget)
            assert result.peak_bytes <= budget
            assert result.recompute_s <= previous * (1 + 1e-12)
            previous = result.recompute_s
        assert previous == 0.0


def largest_first(blocks: list[BlockCost], budget: int) -> tuple[str, ...]:
    """The greedy threshold rule: recompute the blocks that save most, largest first."""
    kinds = ["save"] * len(blocks)
    order = sorted(range(len(blocks)), key=lambda i: -blocks[i].option("save").kept_bytes)
    for i in order:
        if peak_of(blocks, kinds) <= budget:
            break
        kinds[i] = "recompute"
    return tuple(kinds)


def test_plan_beats_the_largest_first_greedy() -> None:
    # The big first block is the obvious one to recompute, and that fits (peak 130),
    # but it costs 10 s; recomputing the cheap middle block alone fits too (peak 165).
    blocks = [
        BlockCost("a", (Option("save", 100, 100), Option("recompute", 10, 100, 10.0))),
        BlockCost("b", (Option("save", 60, 60), Option("recompute", 5, 60, 1.0))),
        BlockCost("c", (Option("save", 60, 60), Option("recompute", 5, 60, 1.0))),
    ]
    budget = 165
    greedy = largest_first(blocks, budget)
    assert greedy == ("recompute", "save", "save")
    assert peak_of(blocks, greedy) <= budget
    result = plan(blocks, budget)
    assert result.choices == ("save", "recompute", "save")
    assert result.peak_bytes == 165
    assert (
        result.recompute_s
        == 1.0
        < sum(b.option(k).recompute_s for b, k in zip(blocks, greedy, strict=True))
    )


def test_ties_prefer_lower_peak() -> None:
    # Recomputing either block costs 1 s and both fit; recomputing the first one
    # also lowers the memory of the second block's backward (peak 90, not 105).
    blocks = [
        BlockCost("x", (Option("save", 50, 80), Option("recompute", 10, 60, 1.0))),
        BlockCost("y", (Option("save", 50, 80), Option("recompute", 10, 55, 1.0))),
    ]
    assert peak_of(blocks, ["save", "save"]) == 130
    assert peak_of(blocks, ["save", "recompute"]) == 105
    result = plan(blocks, 120)
    assert result.choices == ("recompute", "save")
    assert (result.peak_bytes, result.recompute_s) == (90, 1.0)


def test_ties_prefer_fewer_recomputing_blocks() -> None:
    # Peaks equal the bytes kept; freeing 80 bytes costs 1 s by recomputing one block
    # or by making both selective: the same time and peak, but one block, not two.
    options = (
        Option("save", 100, 100),
        Option("selective", 60, 60, 0.5),
        Option("recompute", 20, 20, 1.0),
    )
    blocks = [BlockCost("x", options), BlockCost("y", options)]
    assert peak_of(blocks, ["selective", "selective"]) == 120
    result = plan(blocks, 120)
    assert sorted(result.choices) == ["recompute", "save"]
    assert (result.peak_bytes, result.recompute_s) == (120, 1.0)


def test_plan_groups_blocks_by_kind() -> None:
    result = Plan(
        names=("b0", "b1", "b2", "b3"),
        choices=("recompute", "save", "recompute", "selective"),
        peak_bytes=10,
        recompute_s=1.0,
    )
    assert result.blocks_by_kind() == {
        "recompute": ("b0", "b2"),
        "save": ("b1",),
        "selective": ("b3",),
    }
    assert result.blocks("save") == ("b1",)
    assert result.blocks("offload") == ()


def test_hundred_blocks_plan_quickly() -> None:
    blocks = large_random_blocks(42)
    lowest, highest = min_peak(blocks), peak_of(blocks, ["save"] * 100)
    start = time.perf_counter()
    results = [plan(blocks, lowest + (highest - lowest) * k // 10) for k in range(11)]
    elapsed = time.perf_counter() - start
    assert elapsed < 5 * 11  # generous: about 0.1 s each on a shared 2-core box
    for k, result in enumerate(results):
        budget = lowest + (highest - lowest) * k // 10
        assert result.peak_bytes == peak_of(blocks, result.choices) <= budget
        greedy = largest_first(blocks, budget)
        if peak_of(blocks, greedy) <= budget:
            greedy_s = sum(b.option(c).recompute_s for b, c in zip(blocks, greedy, strict=True))
            assert result.recompute_s <= greedy_s + 1e-12


# ---------------------------------------------------------------- revolve


@cache
def advances(steps: int, slots: int) -> int:
    """Griewank's recursion: advance k, reverse the right part with one slot fewer
    (the slot at step k is taken), then the left part with all slots again."""
    if steps <= 1:
        return 0
    if slots == 1:
        return steps * (steps - 1) // 2  # rerun from the start for every step
    return min(k + advances(steps - k, slots - 1) + advances(k, slots) for k in range(1, steps))


@pytest.mark.parametrize("slots", [1, 2, 3, 4, 6])
def test_revolve_matches_the_recursion(slots: int) -> None:
    for steps in range(0, 45):
        assert revolve_forward_steps(steps, slots) == advances(steps, slots), (steps, slots)


def test_revolve_closed_form_at_the_binomial_thresholds() -> None:
    # At l = beta(s, r) = C(s + r, s) every step is advanced r times but the tail:
    # t = r * l - beta(s + 1, r - 1).
    for s in range(1, 6):
        for r in range(1, 6):
            steps = math.comb(s + r, s)
            expected = r * steps - math.comb(s + r, s + 1)
            assert revolve_forward_steps(steps, s) == expected == advances(steps, s)


def test_revolve_limits() -> None:
    assert revolve_forward_steps(10, 10) == 9  # one sweep storing every input
    assert revolve_forward_steps(10, 50) == 9
    assert revolve_forward_steps(10, 1) == 45
    assert revolve_forward_steps(1, 1) == 0
    assert revolve_forward_steps(0, 0) == 0
    # C(13, 10) = 286 < 1000 <= C(14, 10) = 1001: with ten slots each block is advanced
    # at most r = 4 times (one slot: up to 999 times).
    assert 3 * 1000 < revolve_forward_steps(1000, 10) <= 4 * 1000


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Option("save", -1, 5), "kept_bytes must be >= 0"),
        (lambda: Option("save", 1, -5), "peak_bytes must be >= 0"),
        (lambda: Option("save", 10, 5), r"peak_bytes \(5\) must be >= kept_bytes \(10\)"),
        (lambda: Option("recompute", 1, 5, -0.1), "recompute_s must be finite and >= 0"),
        (lambda: Option("recompute", 1, 5, math.nan), "recompute_s must be finite"),
        (lambda: Option("save", 1.5, 5), "kept_bytes must be an integer"),
        (lambda: Option("", 1, 5), "non-empty string"),
        (lambda: BlockCost("blocks.0", ()), "has no options"),
        (
            lambda: BlockCost("blocks.0", (Option("save", 1, 1), Option("save", 2, 2))),
            r"duplicate option kinds: \['save'\]",
        ),
        (lambda: BlockCost("", (Option("save", 1, 1),)), "block name"),
        (lambda: BlockCost("b", ("save",)), "options must be Option"),
        (lambda: Plan(names=("a",), choices=(), peak_bytes=0, recompute_s=0.0), "1 block names"),
        (lambda: revolve_forward_steps(-1, 2), "n must be >= 0"),
        (lambda: revolve_forward_steps(3, 0), "slots >= 1"),
    ],
)
def test_invalid_inputs_are_rejected(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_plan_rejects_duplicate_block_names_and_unknown_kinds() -> None:
    block = BlockCost("blocks.0", (Option("save", 1, 1),))
    with pytest.raises(ValueError, match=r"duplicate block names: \['blocks.0'\]"):
        plan([block, block], 10)
    with pytest.raises(KeyError, match=r"no option 'offload'; valid: \['save'\]"):
        block.option("offload")
    with pytest.raises(ValueError, match="1 blocks but 2 choices"):
        peak_of([block], ["save", "save"])


def test_options_accept_integer_like_bytes_and_store_ints() -> None:
    option = Option("save", True + 1, 3, 1)  # bool and int are integer-like
    assert option.kept_bytes == 2 and isinstance(option.recompute_s, float)
    assert BlockCost("b", [option]).options == (option,)  # a list becomes a tuple
