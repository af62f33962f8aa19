"""The ``compiled`` strategy: blocks under torch.compile with PyTorch's activation budget.

A cold Inductor compile of one tiny ViT block takes about half a minute on a loaded CPU,
so the default run compiles once (the gradient test); the others are marked slow.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from orchestrator.grid import GridError, parse_grid
from orchestrator.spec import TrainConfig, TrialSpec
from workers.backbones import create_backbone
from workers.checkpointing import Checkpointer, block_modes, find_blocks
from workers.data import ImageData
from workers.memory import ActivationMeter
from workers.trial import run_trial


def _vit(strategy: str, args: dict | None = None) -> tuple[torch.nn.Module, Checkpointer]:
    torch.manual_seed(0)
    model = create_backbone("vit_test", num_classes=4).train()
    return model, Checkpointer(strategy, args, model)


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN202
    """Loss, gradients and bytes saved for backward of one forward + backward."""
    model.zero_grad(set_to_none=True)
    meter = ActivationMeter(model)
    with meter:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, meter.last_bytes


def _compiler(model: torch.nn.Module):  # noqa: ANN202
    (compiler,) = {
        id(b._vramsweep_compiler): b._vramsweep_compiler for _, b in find_blocks(model)
    }.values()
    return compiler


def _assert_same_grads(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys() and expected
    for name in expected:
        assert torch.allclose(expected[name], actual[name], atol=1e-5, rtol=1e-4), name


def test_compiled_blocks_give_eager_gradients_with_fewer_saved_bytes() -> None:
    eager, _ = _vit("none")
    model, ckpt = _vit("compiled", {"budget": 0.5})
    assert set(block_modes(model).values()) == {"compiled"} and not ckpt.wants_profile
    assert ckpt.compile_s == 0.0  # compiled on the first training forward, not before

    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    loss_a, grads_a, saved_a = _step(eager, x, y)
    loss_b, grads_b, saved_b = _step(model, x, y)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    _assert_same_grads(grads_a, grads_b)
    assert 0 < saved_b < 0.8 * saved_a  # the partitioner recomputes within its budget
    compiler = _compiler(model)
    assert compiler.compiles == 1  # four identical blocks, one compiled graph
    first = ckpt.compile_s
    assert first > 0

    # the smaller last batch of an epoch and evaluation do not compile again
    _, grads_a, _ = _step(eager, x[:5], y[:5])
    _, grads_b, _ = _step(model, x[:5], y[:5])
    _assert_same_grads(grads_a, grads_b)
    eager.eval(), model.eval()
    with torch.no_grad():
        assert torch.allclose(eager(x), model(x), atol=1e-5)
    assert compiler.compiles == 1 and ckpt.compile_s == first


def test_grid_names_compiled_with_its_budget() -> None:
    raw = {
        "name": "compiled",
        "output": "results/compiled",
        "budget_mb": 256,
        "seeds": [0],
        "datasets": {"digits": {"image_size": 32}},
        "backbones": ["vit_test"],
        "methods": {"full": {}},
        "checkpointing": {"none": {}, "compiled": {"budget": 0.25}},
        "train": {"epochs": 1, "batch_size": 16},
    }
    grid = parse_grid(raw)
    assert {c.name: c.args for c in grid.checkpointing}["compiled"] == {"budget": 0.25}
    with pytest.raises(GridError, match=r"budget must be in \[0, 1\], got 1.5"):
        parse_grid(raw | {"checkpointing": {"compiled": {"budget": 1.5}}})


@pytest.mark.slow
def test_each_budget_compiles_its_own_graph() -> None:
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    _, grads_eager, _ = _step(_vit("none")[0], x, y)
    saved = {}
    for budget in (1.0, 0.1):  # the second must not reuse the first's graph
        model, _ = _vit("compiled", {"budget": budget})
        _, grads, saved[budget] = _step(model, x, y)
        _assert_same_grads(grads_eager, grads)
        assert _compiler(model).compiles == 1
    assert saved[0.1] < saved[1.0]


@pytest.mark.slow
def test_trial_records_compile_time_apart_from_training(synthetic_data: ImageData) -> None:
    train = TrainConfig(epochs=1, batch_size=16, lr=1e-3, max_steps=3)
    synth = {"num_classes": 4, "images_per_class": 24, "image_size": 16}
    records = {
        strategy: run_trial(
            TrialSpec(
                backbone="vit_test",
                method="lora",
                dataset="synthetic",
                dataset_args=synth,
                train=train,
                budget_mb=2048,
                checkpointing=strategy,
            ),
            num_threads=1,
            data=synthetic_data,
        )
        for strategy in ("none", "compiled")
    }
    plain, compiled = records["none"], records["compiled"]
    assert plain.status == compiled.status == "ok"
    assert plain.compile_s == 0.0
    assert compiled.compile_s > 0
    assert compiled.first_step_s > compiled.compile_s  # compiled within the first step
    assert set(json.loads(compiled.ckpt_plan).values()) == {"compiled"}
    assert compiled.ckpt_profile_s is None  # nothing profiled
    assert compiled.steps == plain.steps == 3


def test_every_trial_in_a_worker_compiles_past_dynamos_recompile_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One worker process runs trial after trial: each new compiler compiles its blocks
    again, never falling back to eager at Dynamo's recompile limit (here 1; Inductor
    replaced by the graph itself, so nothing slow is compiled)."""
    from workers.block_compiler import BlockCompiler

    def eager_backend(self, graph, example_inputs):  # noqa: ANN001, ANN202
        self.compiles += 1
        return graph.forward

    monkeypatch.setattr(BlockCompiler, "_backend", eager_backend)
    layer = torch.nn.Linear(4, 4)
    # torch's own patch: monkeypatch's undo deletes the setting, which hides it from
    # every later compile in this process
    with torch._dynamo.config.patch(recompile_limit=1):
        for budget in (0.5, 0.25, 0.75):  # three trials, each with its own compiler
            compiler = BlockCompiler(budget)
            out = compiler.wrap(layer.forward)(torch.ones(2, 4))
            assert compiler.compiles == 1, budget
            torch.testing.assert_close(out, layer(torch.ones(2, 4)))
