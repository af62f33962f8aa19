"""How far each non-default method option lands from the authors' output (docs/methods.md).

Relative Frobenius differences on the committed reference fixtures
(tests/fixtures/official/), plus the activation masks of MobileTL on N(0, 3^2) inputs.

    .venv/bin/python benchmarks/official_diff.py
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from workers.methods.lbp_wht import LowRankLinear, TokenGrid, walsh_bases
from workers.methods.mobiletl import StepGradActivation
from workers.methods.snella import SnellaArgs, SnellaLinear, allocate, keep_schedule

FIXTURES = Path(__file__).parents[1] / "tests" / "fixtures" / "official"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def lbp_wht() -> None:
    fixture = torch.load(FIXTURES / "lbp_wht.pt", weights_only=True)
    for case in ("vit_s16_224", "tiny_vit_window_7x7", "tiny_vit_mlp_28x28"):
        c = fixture[case]
        grid = TokenGrid(c["extra_tokens"], c["h"], c["w"])
        for order in c["lp_tri_orders"]:
            row = []
            for padding in ("reflect", "zero"):
                x, w, b = (c[k].double().requires_grad_(True) for k in ("x", "weight", "bias"))
                y = LowRankLinear.apply(x, w, b, grid, walsh_bases(8, order).double(), padding)
                gx, gw, _ = torch.autograd.grad(y, (x, w, b), c["grad_y"].double())
                row += [rel(gw, c[f"grad_weight_lp{order}"]), rel(gx, c[f"grad_x_lp{order}"])]
            print(f"lbp_wht {case} order {order}: reflect W {row[0]:.1e} x {row[1]:.1e}; "
                  f"zero W {row[2]:.2f} x {row[3]:.2f}")  # fmt: skip


def snella() -> None:
    fixture = torch.load(FIXTURES / "snella.pt", weights_only=True)
    params = fixture["params"]
    torch.manual_seed(0)
    thirds = [list(range(i, i + 16)) for i in (0, 16, 32)]
    split = SnellaLinear(nn.Linear(16, 48).double(), SnellaArgs(r=8), thirds)
    fused = SnellaLinear(nn.Linear(16, 48).double(), SnellaArgs(r=8, qkv="fused"))
    with torch.no_grad():
        for part, name in zip(split.snella_parts, "qkv", strict=True):
            part.A.copy_(torch.cat(list(params[name]["In_Qs"]), dim=1))
            part.B.copy_(torch.cat(list(params[name]["Out_Qs"]), dim=1))
        for part in split.snella_parts[1:]:  # one A for all: only the kernel's span differs
            part.A.copy_(split.snella_parts[0].A)
        fused.snella_parts[0].A.copy_(split.snella_parts[0].A)
        fused.snella_parts[0].B.copy_(torch.cat([p.B for p in split.snella_parts]))
        print(f"snella qkv fused vs split (same factors, keep 0.99): "
              f"{rel(fused.delta_weight(), split.delta_weight()):.2f}")  # fmt: skip
        scaled = SnellaLinear(nn.Linear(16, 48).double(), SnellaArgs(r=8, update="scaled"), thirds)
        diff = rel(scaled.delta_weight(), split.delta_weight())
        print(f"snella update scaled at step 0: {diff:.2f}")
    sizes = [256, 256, 256, 256, 1024, 1024]
    volume = int(0.5 * sum(sizes))
    equal, by_size = allocate([0] * 6, sizes, volume), allocate([0] * 6, sizes, volume, "size")
    print(f"snella zero scores, keep 0.5 of a ViT block: equal {equal} vs size {by_size}")
    config = SnellaArgs(final_keep=0.2)
    mid = [keep_schedule(s, 100 * 10, config) for s in (5, 505)]
    epoch = [keep_schedule(e, 100, config) for e in (0, 50)]
    print(f"snella schedule step vs epoch (100 epochs of 10 steps), keep at steps 5 and 505: "
          f"step {mid[0]:.4f} {mid[1]:.4f}, epoch {epoch[0]:.4f} {epoch[1]:.4f}")  # fmt: skip


def mobiletl() -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 3
    grad = torch.ones_like(x)
    for act, fn, mask in ((nn.ReLU6(), F.relu6, "signed"), (nn.Hardswish(), F.hardswish, "exact")):
        ours = x.clone().requires_grad_(True)
        StepGradActivation(act, mask)(ours).backward(grad)
        exact = x.clone().requires_grad_(True)
        fn(exact).backward(grad)
        print(
            f"mobiletl {type(act).__name__} ({mask}) vs autograd: {rel(ours.grad, exact.grad):.3f}"
        )


if __name__ == "__main__":
    lbp_wht()
    snella()
    mobiletl()
