"""Budget-aware checkpoint planning: per block, how much to keep for backward.

The pure core of an adaptive gradient-checkpointing strategy. A profiler measures,
for every block, a few *options* (keep everything, keep part and recompute the rest,
keep only the input and recompute the block); :func:`plan` picks one option per
block so that the activation memory fits a budget at the least recompute time.
No torch here: the inputs are plain numbers, so the planner is exact and testable.

Memory model
------------
A chain of ``n`` blocks runs forward in order ``0..n-1`` and backward in order
``n-1..0``. Each block chooses one :class:`Option`:

* ``kept_bytes``: bytes the block holds from its forward until its backward (all
  saved activations for ``"save"``, the non-recomputed part for ``"selective"``,
  only the block input for ``"recompute"``);
* ``peak_bytes`` (``>= kept_bytes``): bytes alive for the block while its backward
  runs, i.e. the re-materialised activations plus what was kept;
* ``recompute_s``: extra seconds paid in backward (0 for ``"save"``).

While block ``i``'s backward runs, the blocks before it still hold what they kept,
so memory is ``sum(kept[j] for j < i) + peak[i]``; at the end of forward it is
``sum(kept)``. The plan's peak is the largest of these ``n + 1`` numbers. The caller
subtracts the static part (weights, gradients, optimizer state, workspace) from the
device budget; the planner sees only the activation budget.

Algorithm
---------
An exact dynamic programme over the blocks from last to first. Counted from the
bytes kept before block ``i``, the peak of blocks ``i..n-1`` is
``P[i] = max(peak[i], kept[i] + P[i + 1])`` with ``P[n] = 0``, and the plan's peak
is ``P[0]``. So a partial plan of blocks ``i..`` is summarised by one number more
than its cost: ``(P, T, r)``, its suffix peak, recompute seconds and recomputing
blocks. (Going forward would need two: bytes kept so far and the peak so far.)
Prepending a block makes the new ``P``, ``T`` and ``r`` non-decreasing in the old
ones, so a partial plan that another matches in ``P`` and in ``(T, r)`` can be
dropped without losing an optimum, ties included; what is left is a staircase, one
sort per block. Also dropped: suffixes whose peak plus the fewest bytes the earlier
blocks can keep exceeds the budget, and suffixes whose time plus a lower bound on
the earlier blocks' time (a linear relaxation) exceeds that of a plan found
greedily. Bytes are never rounded or bucketed; the greedy plan and the relaxation
only prune, they never choose.

Example::

    options = (Option("save", 100, 100), Option("recompute", 10, 100, 0.02))
    blocks = [BlockCost("blocks.0", options), BlockCost("blocks.1", options)]
    plan(blocks, budget_bytes=150).choices  # ("recompute", "save"): peak 110
"""

from __future__ import annotations

import bisect
import logging
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

MIB = 1 << 20


@dataclass(frozen=True)
class Option:
    """One way to run a block: what it keeps, its backward peak, its extra time.

    Bytes are integers (a profiler's counts, not estimates rounded to MiB); times
    are seconds per training step.
    """

    kind: str  # e.g. "save", "selective", "recompute"
    kept_bytes: int  # held from the block's forward to its backward
    peak_bytes: int  # alive for this block while its backward runs (>= kept_bytes)
    recompute_s: float = 0.0  # extra seconds paid in backward

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"option kind must be a non-empty string, got {self.kind!r}")
        for field_name in ("kept_bytes", "peak_bytes"):
            value = getattr(self, field_name)
            try:
                as_int = operator.index(value)
            except TypeError:
                raise ValueError(
                    f"option {self.kind!r}: {field_name} must be an integer, got {value!r}"
                ) from None
            if as_int < 0:
                raise ValueError(f"option {self.kind!r}: {field_name} must be >= 0, got {value}")
            object.__setattr__(self, field_name, as_int)
        if self.peak_bytes < self.kept_bytes:
            raise ValueError(
                f"option {self.kind!r}: peak_bytes ({self.peak_bytes}) must be >= "
                f"kept_bytes ({self.kept_bytes}): what is kept is alive in backward too"
            )
        seconds = float(self.recompute_s)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(
                f"option {self.kind!r}: recompute_s must be finite and >= 0, "
                f"got {self.recompute_s!r}"
            )
        object.__setattr__(self, "recompute_s", seconds)

    @property
    def recomputes(self) -> bool:
        """Whether choosing this option costs time in backward (counted for tie-breaks)."""
        return self.recompute_s > 0


@dataclass(frozen=True)
class BlockCost:
    """A block's measured options, e.g. from a profiler; kinds are unique per block."""

    name: str
    options: tuple[Option, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"block name must be a non-empty string, got {self.name!r}")
        options = tuple(self.options)
        if not options:
            raise ValueError(f"block {self.name!r} has no options")
        for option in options:
            if not isinstance(option, Option):
                raise ValueError(f"block {self.name!r}: options must be Option, got {option!r}")
        kinds = [o.kind for o in options]
        duplicates = sorted({k for k in kinds if kinds.count(k) > 1})
        if duplicates:
            raise ValueError(f"block {self.name!r} has duplicate option kinds: {duplicates}")
        object.__setattr__(self, "options", options)

    def option(self, kind: str) -> Option:
        """The option named ``kind``; unknown kinds fail with the valid ones."""
        for option in self.options:
            if option.kind == kind:
                return option
        valid = [o.kind for o in self.options]
        raise KeyError(f"block {self.name!r} has no option {kind!r}; valid: {valid}")


@dataclass(frozen=True)
class Plan:
    """The chosen option kind per block, with the peak and time it costs."""

    names: tuple[str, ...]  # block names, forward order
    choices: tuple[str, ...]  # option kind per block
    peak_bytes: int  # largest activation memory over the step (see module docstring)
    recompute_s: float  # total extra seconds in backward

    def __post_init__(self) -> None:
        if len(self.names) != len(self.choices):
            raise ValueError(f"{len(self.names)} block names but {len(self.choices)} choices")

    def blocks_by_kind(self) -> dict[str, tuple[str, ...]]:
        """Block names grouped by chosen kind, in forward order (kinds as first chosen)."""
        groups: dict[str, list[str]] = {}
        for name, kind in zip(self.names, self.choices, strict=True):
            groups.setdefault(kind, []).append(name)
        return {kind: tuple(names) for kind, names in groups.items()}

    def blocks(self, kind: str) -> tuple[str, ...]:
        """Names of the blocks that chose ``kind`` (empty if none did)."""
        return self.blocks_by_kind().get(kind, ())


class Infeasible(ValueError):
    """No choice of options fits the budget; ``min_peak_bytes`` is the best possible."""

    def __init__(self, budget_bytes: int, min_peak_bytes: int, n_blocks: int) -> None:
        self.budget_bytes = budget_bytes
        self.min_peak_bytes = min_peak_bytes
        super().__init__(
            f"activation budget {budget_bytes} bytes ({budget_bytes / MIB:.1f} MiB) is below "
            f"the smallest achievable peak {min_peak_bytes} bytes "
            f"({min_peak_bytes / MIB:.1f} MiB) over {n_blocks} blocks"
        )


def peak_of(blocks: Sequence[BlockCost], choices: Sequence[str]) -> int:
    """The activation peak of one assignment of option kinds (the memory model above)."""
    if len(blocks) != len(choices):
        raise ValueError(f"{len(blocks)} blocks but {len(choices)} choices")
    kept = peak = 0
    for block, kind in zip(blocks, choices, strict=True):
        option = block.option(kind)
        peak = max(peak, kept + option.peak_bytes)
        kept += option.kept_bytes
    return max(peak, kept)


def min_peak(blocks: Sequence[BlockCost]) -> int:
    """The smallest activation peak any assignment reaches (exact; ignores time).

    Used for :class:`Infeasible`'s message and as the low end of a budget sweep. The
    suffix peak ``P[i] = max(peak[i], kept[i] + P[i + 1])`` (``P[n] = 0``) grows with
    ``P[i + 1]``, so minimising each suffix from the last block back is optimal.
    """
    suffix = 0
    for block in reversed(blocks):
        suffix = min(max(o.peak_bytes, o.kept_bytes + suffix) for o in block.options)
    return suffix


def _greedy_time_bound(blocks: Sequence[BlockCost], budget_bytes: int) -> float:
    """Recompute time of some plan within budget (``inf`` if this greedy finds none).

    Only an upper bound that lets the exact DP drop states early: start from the
    fastest option per block and repeatedly switch to the option that frees the
    most kept bytes per extra second until the peak fits.
    """
    current = [min(b.options, key=lambda o: (o.recompute_s, o.peak_bytes)) for b in blocks]
    while True:
        kinds = [o.kind for o in current]
        if peak_of(blocks, kinds) <= budget_bytes:
            return sum((o.recompute_s for o in current), 0.0)
        best_score, best_switch = -math.inf, None
        for i, block in enumerate(blocks):
            for option in block.options:
                freed = current[i].kept_bytes - option.kept_bytes
                if freed <= 0:
                    continue
                extra = option.recompute_s - current[i].recompute_s
                score = math.inf if extra <= 0 else freed / extra
                if score > best_score:
                    best_score, best_switch = score, (i, option)
        if best_switch is None:
            return math.inf
        i, option = best_switch
        current[i] = option


class _PrefixTimeBound:
    """Lower bounds on the recompute time of blocks ``..i-1`` whose kept bytes sum to <= c.

    The linear relaxation of that multiple-choice knapsack: per block, the lower
    convex hull of its (kept, time) points, walked from its fastest option; across
    blocks, hull segments are taken cheapest seconds-per-freed-byte first, the last
    one fractionally. Only the end-of-forward constraint is used, so it never
    exceeds the true minimum; it lets :func:`plan` drop suffix plans whose prefix
    cannot be finished within a known plan's time.
    """

    def __init__(self, blocks: Sequence[BlockCost]) -> None:
        n = len(blocks)
        self._base_kept = [0] * (n + 1)
        self._base_time = [0.0] * (n + 1)
        self._freed: list[list[int]] = [[] for _ in range(n + 1)]  # cumulative
        self._spent: list[list[float]] = [[] for _ in range(n + 1)]  # cumulative
        segments: list[tuple[float, int, float]] = []  # (seconds per byte, bytes, seconds)
        for i in range(1, n + 1):
            start, hull = self._hull(blocks[i - 1].options)
            self._base_kept[i] = self._base_kept[i - 1] + start[0]
            self._base_time[i] = self._base_time[i - 1] + start[1]
            segments.extend(hull)
            segments.sort()
            freed, spent, total_b, total_s = [], [], 0, 0.0
            for _, b, s in segments:
                total_b += b
                total_s += s
                freed.append(total_b)
                spent.append(total_s)
            self._freed[i], self._spent[i] = freed, spent

    @staticmethod
    def _hull(
        options: Sequence[Option],
    ) -> tuple[tuple[int, float], list[tuple[float, int, float]]]:
        """The fastest (then smallest) option and the hull segments towards less kept."""
        fastest = min(options, key=lambda o: (o.recompute_s, o.kept_bytes))
        start = (fastest.kept_bytes, fastest.recompute_s)
        points = sorted(
            {(o.kept_bytes, o.recompute_s) for o in options if o.kept_bytes < start[0]},
            key=lambda p: (-p[0], p[1]),
        )
        chain = [start]
        for point in points:
            if point[0] == chain[-1][0]:
                continue  # same kept, more time: never on the lower hull
            while len(chain) >= 2 and _slope(chain[-2], chain[-1]) >= _slope(chain[-1], point):
                chain.pop()
            chain.append(point)
        hull = []
        for a, b in zip(chain, chain[1:], strict=False):
            hull.append((_slope(a, b), a[0] - b[0], b[1] - a[1]))
        return start, hull

    def at_least(self, i: int, capacity: float) -> float:
        """Lower bound on the time of blocks ``..i-1`` kept within ``capacity`` bytes."""
        need = self._base_kept[i] - capacity
        if need <= 0:
            return self._base_time[i]
        freed = self._freed[i]
        j = bisect.bisect_left(freed, need)
        if j == len(freed):
            return math.inf
        before_b = freed[j - 1] if j else 0
        before_s = self._spent[i][j - 1] if j else 0.0
        fraction = (need - before_b) / (freed[j] - before_b)
        return self._base_time[i] + before_s + fraction * (self._spent[i][j] - before_s)


def _slope(a: tuple[int, float], b: tuple[int, float]) -> float:
    """Seconds paid per byte freed going from point ``a`` to ``b`` (``b`` keeps less)."""
    return (b[1] - a[1]) / (a[0] - b[0])


# A partial plan of blocks i..n-1: (suffix peak, seconds, recomputing blocks, choices),
# the choices a linked list (option index of block i, choices of blocks i+1..).
_State = tuple[int, float, int, "tuple | None"]


def plan(blocks: Sequence[BlockCost], budget_bytes: int) -> Plan:
    """The assignment of least recompute time whose peak fits ``budget_bytes``.

    Ties go to the lower peak, then to fewer recomputing blocks (options with
    ``recompute_s > 0``). Raises :class:`Infeasible` when even :func:`min_peak`
    exceeds the budget.

    Example::

        p = plan(profiled_blocks, budget_bytes=device_budget - static_bytes)
        to_checkpoint = p.blocks("recompute")
    """
    blocks = list(blocks)
    if isinstance(budget_bytes, float) and math.isnan(budget_bytes):
        raise ValueError("budget_bytes must be a number, got nan")
    names = tuple(b.name for b in blocks)
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate block names: {duplicates}")

    # prefix[i]: the fewest bytes blocks 0..i-1 can keep; they sit under every peak
    # of blocks i.., so a suffix whose peak exceeds budget - prefix[i] cannot fit.
    prefix = [0]
    for block in blocks:
        prefix.append(prefix[-1] + min(o.kept_bytes for o in block.options))
    # Any plan that fits bounds the optimum's time: drop suffixes that, even with the
    # relaxed cheapest prefix, are slower. Slack on the float sums: never drop a tie.
    time_limit = _greedy_time_bound(blocks, budget_bytes) * (1 + 1e-9) + 1e-12
    prefix_time = _PrefixTimeBound(blocks)
    states: list[_State] = [(0, 0.0, 0, None)]
    for i in range(len(blocks) - 1, -1, -1):
        room = budget_bytes - prefix[i]
        candidates = []
        for suffix_peak, seconds, count, chain in states:
            for index, option in enumerate(blocks[i].options):
                peak = max(option.peak_bytes, option.kept_bytes + suffix_peak)
                if peak > room:
                    continue
                new_seconds = option.recompute_s + seconds
                if (
                    new_seconds > time_limit
                    or new_seconds + prefix_time.at_least(i, budget_bytes - peak) * (1 - 1e-9)
                    > time_limit
                ):
                    continue
                candidates.append(
                    (
                        peak,
                        new_seconds,
                        count + option.recomputes,
                        (index, chain),
                    )
                )
        states = _front(candidates)
        if not states:
            raise Infeasible(budget_bytes, min_peak(blocks), len(blocks))

    peak, _, _, chain = min(states, key=lambda s: (s[1], s[0], s[2]))
    indices: list[int] = []
    while chain is not None:
        index, chain = chain
        indices.append(index)
    chosen = [b.options[k] for b, k in zip(blocks, indices, strict=True)]
    result = Plan(
        names=names,
        choices=tuple(o.kind for o in chosen),
        peak_bytes=peak,
        recompute_s=sum((o.recompute_s for o in chosen), 0.0),
    )
    log.debug(
        "planned %d blocks in %s bytes: peak %d, recompute %.4fs",
        len(blocks),
        budget_bytes,
        result.peak_bytes,
        result.recompute_s,
    )
    return result


def _front(candidates: list[_State]) -> list[_State]:
    """The states that no other matches in both suffix peak and (time, count).

    A dropped state's every extension is matched by the same extension of the state
    that beat it (peak, time and count all grow monotonically), so nothing optimal,
    ties included, is lost.
    """
    candidates.sort(key=operator.itemgetter(0, 1, 2))
    kept: list[_State] = []
    best: tuple[float, int] = (math.inf, 0)
    for state in candidates:
        cost = (state[1], state[2])
        if cost < best:
            kept.append(state)
            best = cost
    return kept


def revolve_forward_steps(n: int, slots: int) -> int:
    """Griewank's minimal number of forward *advances* to reverse ``n`` blocks.

    ``t(l, s)`` of Griewank (1992), "Achieving logarithmic growth of temporal and
    spatial complexity in reverse automatic differentiation", Optim. Methods Softw.
    1(1); the schedule is revolve (Griewank & Walther 2000, ACM TOMS 26(1)).
    Model: a slot holds one block input, the chain input occupies one of the
    ``slots``; each block's backward re-runs that block's forward once from its
    input (taped), and an *advance* is any other block forward evaluation. So the
    schedule runs ``n + t`` block forwards, i.e. ``t`` more than a step that stores
    everything; with ``slots >= n`` it is ``n - 1`` (one sweep storing every input
    stops before the last block, whose taped run ends the forward).

    Closed form: with ``beta(s, r) = C(s + r, s)`` and ``r`` the repetition number,
    ``beta(s, r - 1) < n <= beta(s, r)``, ``t = r * n - C(s + r, s + 1)``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return 0
    if slots < 1:
        raise ValueError(f"reversing {n} blocks needs slots >= 1 (the chain input), got {slots}")
    r = 0
    while math.comb(slots + r, slots) < n:
        r += 1
    return r * n - math.comb(slots + r, slots + 1)
