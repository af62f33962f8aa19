"""peft's first import defers bitsandbytes' ``torch.compile`` to the first call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.methods.peft_import import compile_on_first_call, compiles_deferred

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys, torch
real = torch.compile
if sys.argv[1] == "ours":
    from workers.methods.peft_import import import_peft
    import_peft()
else:
    import peft
modules = {
    "peft": "peft" in sys.modules,
    "bitsandbytes": "bitsandbytes" in sys.modules,
    "inductor": "torch._inductor.compile_fx" in sys.modules,
    "compile_restored": torch.compile is real,
}
if sys.argv[1] == "ours":  # a QLoRA step on 4-bit layers: peft and bitsandbytes work so
    from workers.backbones import classifier_name, create_backbone
    from workers.methods import MethodContext, apply_method
    torch.manual_seed(0)
    model = create_backbone("vit_test", num_classes=3, img_size=16)
    ctx = MethodContext(classifier=classifier_name(model), total_steps=2)
    adapted = apply_method("qlora", {}, model, ctx).model
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    adapted(torch.randn(2, 3, 16, 16)).logsumexp(dim=1).sum().backward()
    torch.optim.SGD(trainable, lr=0.1).step()
    modules["qlora_learned"] = any(not torch.equal(a, b) for a, b in zip(before, trainable))
print(json.dumps(modules))
"""


def _modules_after(how: str) -> dict[str, bool]:
    """What a fresh interpreter holds after importing peft ``how`` ("ours" or "plain")."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, how], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_importing_peft_leaves_inductor_unimported_where_a_plain_import_loads_it():
    plain, ours = _modules_after("plain"), _modules_after("ours")
    # the premise: bitsandbytes, imported by peft, loads Inductor through torch.compile
    assert plain["peft"] and plain["bitsandbytes"] and plain["inductor"]
    assert ours["peft"] and ours["bitsandbytes"] and not ours["inductor"]
    assert ours["compile_restored"] and plain["compile_restored"]
    # a QLoRA model then builds and learns on 4-bit layers
    assert ours["qlora_learned"]


def test_compile_happens_on_the_first_call_only_with_the_options_given():
    calls = []

    def fake_compile(fn, **options):
        calls.append(options)
        return lambda x: fn(x) + 100

    def double(x):
        return 2 * x

    deferred = compile_on_first_call(fake_compile, double, {"dynamic": False})
    assert calls == [] and deferred.__name__ == "double"
    assert deferred(1) == 102 and deferred(2) == 104
    assert calls == [{"dynamic": False}]


def test_a_compile_that_raises_leaves_the_function_itself_and_is_not_retried():
    calls = []

    def failing_compile(fn, **options):
        calls.append(1)
        raise RuntimeError("no compiler here")

    deferred = compile_on_first_call(failing_compile, lambda x: x + 1, {})
    assert [deferred(1), deferred(2)] == [2, 3]
    assert calls == [1]


def test_torch_compile_is_deferred_inside_and_restored_after_even_on_error():
    real = torch.compile
    with pytest.raises(ValueError), compiles_deferred():
        assert torch.compile is not real
        raise ValueError
    assert torch.compile is real


@pytest.mark.parametrize("as_decorator", [False, True])
def test_a_deferred_compile_is_torch_compile_on_the_first_call(as_decorator):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()

    def f(x):
        return torch.sin(x) * 2

    with compiles_deferred():
        g = torch.compile(backend="eager")(f) if as_decorator else torch.compile(f, backend="eager")
    assert counters["stats"]["unique_graphs"] == 0  # nothing compiled yet
    x = torch.randn(5)
    assert torch.equal(g(x), f(x))
    assert counters["stats"]["unique_graphs"] == 1  # dynamo captured it on the first call
