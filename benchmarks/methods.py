"""What each PEFT method costs on a tiny backbone, measured side by side on this machine.

For every registered method that applies to the backbone, on the same random batch:

- trainable parameters,
- optimizer-state bytes after one AdamW step (what the optimizer holds),
- saved-activation bytes of one training forward (autograd's saved tensors, unique
  storages, parameters excluded: ``workers.memory.ActivationMeter``),
- step time (forward + backward + optimizer step + the method's per-step hook), the
  median of timed steps after warm-up, as a ratio to ``full`` on the same backbone.

Ratios, not absolute times, are the result: the machine is shared and noisy.

    .venv/bin/python benchmarks/methods.py [--steps 20] [--batch 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from workers.backbones import classifier_name, create_backbone, input_size
from workers.memory import ActivationMeter
from workers.methods import METHODS, MethodContext, apply_method, check_applicable
from workers.registry import RegistryError

BACKBONES = ["vit_test", "tiny_vit_test", "mobilenetv2_test", "mobilenetv3_test"]
# Defaults, except SNELLA at LoRA's rank (its paper default r=32 is half the width of
# the tiny models' layers)
ARGS = {"snella": {"r": 8}}


def measure(backbone: str, method: str, steps: int, batch: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=10)
    size = input_size(model)
    ctx = MethodContext(classifier=classifier_name(model), total_steps=steps + 3)
    adapted = apply_method(method, ARGS.get(method), model, ctx)
    model = adapted.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    meter = ActivationMeter(model)
    times = []
    for step in range(1, steps + 4):
        t0 = time.perf_counter()
        with meter:
            loss = F.cross_entropy(model(x), y)
        objective = loss + adapted.regularizer() if adapted.regularizer else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        if adapted.on_optimizer_step:
            adapted.on_optimizer_step(step)
        if step > 3:  # warm-up excluded
            times.append(time.perf_counter() - t0)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "trainable": sum(p.numel() for p in params),
        "optimizer_bytes": sum(v.numel() * v.element_size() for v in state),
        "activation_bytes": meter.peak_bytes,
        "step_s": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"batch {args.batch}, {args.steps} timed steps after 3 warm-up steps, 1 thread")
    print(f"method arguments: defaults, except {ARGS}\n")
    print(
        "| backbone | method | trainable params | optimizer state (KiB) "
        "| saved activations (KiB) | step time vs full |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for backbone in BACKBONES:
        rows = {}
        for method in METHODS.names():
            try:
                check_applicable(method, backbone)
            except RegistryError:
                continue
            rows[method] = measure(backbone, method, args.steps, args.batch)
        ref = rows["full"]["step_s"]
        for method, r in rows.items():
            print(
                f"| {backbone} | {method} | {r['trainable']:,} | "
                f"{r['optimizer_bytes'] / 1024:,.0f} | {r['activation_bytes'] / 1024:,.0f} | "
                f"{r['step_s'] / ref:.2f} |"
            )


if __name__ == "__main__":
    main()
