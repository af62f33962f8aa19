"""peft's first import defers bitsandbytes' ``torch.compile`` to each kernel's first call."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from workers.methods.peft_import import compile_on_first_call, compiles_deferred

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys, torch
real = torch.compile
if sys.argv[1] == "plain":
    import peft
    print(json.dumps({"inductor": "torch._inductor.compile_fx" in sys.modules}))
    sys.exit()
from workers.methods.peft_import import import_peft
import_peft()
seen = {
    "peft": "peft" in sys.modules,
    "bitsandbytes": "bitsandbytes" in sys.modules,
    "inductor": "torch._inductor.compile_fx" in sys.modules,
    "compile_restored": torch.compile is real,
}
# a QLoRA step on 4-bit layers: peft and bitsandbytes work so
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
seen["qlora_learned"] = any(not torch.equal(a, b) for a, b in zip(before, trainable))
# a deferred bitsandbytes kernel: compiled by Inductor on its first call, as it computes
from bitsandbytes.backends.default import ops
kernel = ops._dequantize_4bit_compute
args = (torch.randint(0, 255, (32,), dtype=torch.uint8), torch.rand(1) + 0.5,
        torch.linspace(-1, 1, 16), 64, (8, 8), torch.float32)
seen["inductor_before_call"] = "torch._inductor.compile_fx" in sys.modules
seen["kernel_equal"] = torch.equal(kernel(*args), kernel.__wrapped__(*args))
seen["inductor_after_call"] = "torch._inductor.compile_fx" in sys.modules
print(json.dumps(seen))
"""


def _probe(how: str) -> dict[str, bool]:
    """What a fresh interpreter saw, importing peft ``how`` ("ours" or "plain")."""
    cmd = [sys.executable, "-c", PROBE, how]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_peft_imports_without_inductor_and_its_kernels_compile_on_their_first_call():
    plain = _probe("plain")
    assert plain["inductor"], "a plain import of peft no longer imports Inductor: drop the module"
    ours = _probe("ours")
    assert ours["peft"] and ours["bitsandbytes"] and not ours["inductor"]
    assert ours["compile_restored"]
    assert ours["qlora_learned"]  # QLoRA's model builds and learns on its 4-bit layers
    # a bitsandbytes kernel is compiled when first called, and computes what it did
    assert not ours["inductor_before_call"] and ours["inductor_after_call"]
    assert ours["kernel_equal"]


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


def test_two_threads_calling_first_compile_once():
    calls, second_calls = [], threading.Event()

    def slow_compile(fn, **options):
        calls.append(1)
        second_calls.wait(timeout=5)
        time.sleep(0.2)  # the second call reaches the compile meanwhile, unless it waits
        return fn

    deferred = compile_on_first_call(slow_compile, lambda x: x + 1, {})
    results: list[int] = []
    first = threading.Thread(target=lambda: results.append(deferred(1)))
    first.start()
    while not calls:  # the first call is compiling
        time.sleep(0.01)
    second_calls.set()
    results.append(deferred(2))
    first.join()
    assert sorted(results) == [2, 3] and calls == [1]


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
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def f(x):
        return torch.sin(x) * 2

    with compiles_deferred():
        if as_decorator:
            g = torch.compile(backend=counting_backend)(f)
        else:
            g = torch.compile(f, backend=counting_backend)
    x = torch.randn(5)
    assert torch.equal(g(x), f(x)) and len(graphs) == 1  # captured by dynamo on that call
    assert torch.equal(g(x), f(x)) and len(graphs) == 1  # and compiled once
