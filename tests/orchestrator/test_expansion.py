"""Grid expansion: product of the axes, exclusions, determinism."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from orchestrator.expansion import expand
from orchestrator.grid import Grid, parse_grid
from orchestrator.spec import TrialSpec

BACKBONES = ["vit_test", "tiny_vit_test"]
METHODS = ["full", "lora", "bitfit"]
CHECKPOINTING = ["none", "static"]
SEEDS = [0, 1]
BUDGETS = [1024, 2048]

# 2 backbones x 3 methods x 2 checkpointing x 1 dataset x 2 seeds x 2 budgets = 48
BASE: dict[str, Any] = {
    "name": "expansion",
    "output": "out",
    "budget_mb": BUDGETS,
    "seeds": SEEDS,
    "datasets": ["synthetic"],
    "backbones": BACKBONES,
    "methods": METHODS,
    "checkpointing": CHECKPOINTING,
}
FULL = len(BACKBONES) * len(METHODS) * len(CHECKPOINTING) * len(SEEDS) * len(BUDGETS)


def make_grid(**overrides: Any) -> Grid:
    """BASE with top-level fields replaced, validated."""
    raw = copy.deepcopy(BASE)
    raw.update(overrides)
    return parse_grid(raw, "test.yaml")


def matches(spec: TrialSpec, rule: dict[str, Any]) -> bool:
    """Whether every axis of ``rule`` has its value in ``spec``."""
    return all(getattr(spec, axis) == value for axis, value in rule.items())


def test_count_is_the_product_of_the_axes() -> None:
    """48 trials, and every combination appears exactly once."""
    specs = expand(make_grid())
    assert FULL == 48
    assert len(specs) == FULL
    combos = {
        (s.backbone, s.method, s.checkpointing, s.dataset, s.seed, s.budget_mb) for s in specs
    }
    assert len(combos) == FULL
    assert {s.budget_mb for s in specs} == {1024.0, 2048.0}
    assert all(s.kind == "finetune" for s in specs)


def test_one_exclusion_rule() -> None:
    """{tiny_vit_test, bitfit} removes #checkpointing x #seeds x #budgets = 8 trials."""
    rule = {"backbone": "tiny_vit_test", "method": "bitfit"}
    full = expand(make_grid())
    specs = expand(make_grid(exclude=[rule]))
    removed = len(CHECKPOINTING) * len(SEEDS) * len(BUDGETS)
    assert removed == 8
    assert len(specs) == FULL - removed
    assert not any(matches(s, rule) for s in specs)
    # exactly the matching trials went, the others are untouched and in the same order
    assert [s.trial_id for s in specs] == [s.trial_id for s in full if not matches(s, rule)]
    # the rule is specific: bitfit survives on the other backbone
    assert any(s.method == "bitfit" and s.backbone == "vit_test" for s in specs)


def test_two_overlapping_rules_remove_their_union() -> None:
    """Union by inclusion-exclusion: 8 + 8 - 4 = 12 removed, 36 left."""
    r1 = {"backbone": "tiny_vit_test", "method": "bitfit"}  # 2 ckpt x 2 seeds x 2 budgets = 8
    r2 = {"method": "bitfit", "checkpointing": "static"}  # 2 backbones x 2 x 2 = 8
    both = 2 * 2  # tiny_vit_test + bitfit + static: 2 seeds x 2 budgets
    expected = FULL - (8 + 8 - both)
    assert expected == 36
    specs = expand(make_grid(exclude=[r1, r2]))
    assert len(specs) == expected
    assert not any(matches(s, r1) or matches(s, r2) for s in specs)
    bitfit = [s for s in specs if s.method == "bitfit"]
    assert {(s.backbone, s.checkpointing) for s in bitfit} == {("vit_test", "none")}


def test_exclusion_on_seed_alone() -> None:
    """{seed: 1} removes exactly that seed's trials."""
    specs = expand(make_grid(exclude=[{"seed": 1}]))
    assert len(specs) == FULL // len(SEEDS)
    assert {s.seed for s in specs} == {0}


def test_exclusion_on_budget_matches_int_against_float() -> None:
    """A budget written as an int in `exclude` matches the float budget of the specs."""
    specs = expand(make_grid(exclude=[{"budget_mb": 1024}]))
    assert len(specs) == FULL // len(BUDGETS)
    assert {s.budget_mb for s in specs} == {2048.0}


def test_expansion_is_deterministic_and_ids_unique() -> None:
    """Two expansions (of two separately parsed grids) give the same ids in the same order."""
    first = [s.trial_id for s in expand(make_grid())]
    second = [s.trial_id for s in expand(make_grid())]
    assert first == second
    assert len(set(first)) == len(first)


def test_seeds_are_the_innermost_axis() -> None:
    """Documented order: the grid's order of each axis, seeds innermost."""
    specs = expand(make_grid())
    assert [s.seed for s in specs[:2]] == SEEDS
    assert specs[0].budget_mb == specs[1].budget_mb
    assert specs[0].backbone == "vit_test" and specs[-1].backbone == "tiny_vit_test"


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        pytest.param([512, 1024, 2048], (512.0, 1024.0, 2048.0), id="list-is-an-axis"),
        pytest.param(1536, (1536.0,), id="scalar-is-one-value"),
        pytest.param([768.5], (768.5,), id="one-element-list"),
    ],
)
def test_budget_list_or_scalar(budget: Any, expected: tuple[float, ...]) -> None:
    """budget_mb as a list multiplies the trials; a scalar gives one value."""
    grid = make_grid(budget_mb=budget)
    specs = expand(grid)
    assert grid.budgets_mb == expected
    assert len(specs) == FULL // len(BUDGETS) * len(expected)
    assert sorted({s.budget_mb for s in specs}) == list(expected)


def test_specs_carry_resolved_args_and_train() -> None:
    """Every spec carries the grid's train config and the registry-resolved arguments."""
    grid = make_grid(methods={"lora": {"r": 2}}, train={"epochs": 2, "lr": 0.01})
    specs = expand(grid)
    assert len(specs) == FULL // len(METHODS)
    assert all(s.train is grid.train and s.train.lr == 0.01 for s in specs)
    assert all(s.method_args["r"] == 2 and s.method_args["alpha"] == 16.0 for s in specs)
    static = [s for s in specs if s.checkpointing == "static"]
    assert static and all(s.checkpointing_args == {"every": 1} for s in static)
