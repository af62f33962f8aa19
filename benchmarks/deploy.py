"""What post-training quantization does to a tiny ViT and a tiny Vim, side by side, on CPU.

Each backbone is fine-tuned briefly on scikit-learn's digits (32 px, 10 classes) by
``run_trial``, whose deployment phase then builds the merged float model and its int8
(weights only), w8a8 and Quamba2-style variants (``workers.deploy``), calibrated on 4
training batches, and measures each in the same run. Printed per variant, against float:

- accuracy drop: float top-1 - variant top-1 on the test split, in percentage points;
- size ratio: its safetensors file / the float one (int8 codes + scales vs fp32);
- latency ratio: median forward at batch 1 and at the batch size / float's. Quantization
  is simulated (quantize-dequantize in fp32, no int8 kernel), so these ratios show the
  simulation's overhead, not an int8 speed-up: they are labelled ``simulated``;
- memory ratio: inference peak at batch 1 (stored weights + input + forward peak).

Ratios, not absolute times, are the result: the machine is shared and noisy.

    .venv/bin/python benchmarks/deploy.py [--epochs 3] [--method full] [--threads 2]
"""

from __future__ import annotations

import argparse
import json

from orchestrator.spec import TrainConfig, TrialSpec
from workers.deploy import DeployConfig
from workers.trial import run_trial

BACKBONES = ["vit_test", "vim_test"]  # the tiny ViT and the tiny Vision Mamba (32 px)


def deployed(backbone: str, method: str, epochs: int, threads: int) -> tuple[float, dict]:
    """Train ``backbone`` with ``method`` on digits and deploy it: (trained accuracy,
    variant -> figures)."""
    variants = ["int8", "w8a8", "quamba2"]
    spec = TrialSpec(
        backbone=backbone,
        method=method,
        dataset="digits",
        dataset_args={"image_size": 32},
        train=TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, warmup_epochs=0.5),
        deploy=DeployConfig(variants=variants, ship="w8a8", export="none").to_dict(),
    )
    record = run_trial(spec, num_threads=threads)
    if record.status != "ok":
        raise RuntimeError(f"{backbone}: {record.status}: {record.error}")
    return record.accuracy, json.loads(record.deploy_results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs on digits")
    parser.add_argument("--method", default="full", help="PEFT method of the trials")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    print(
        f"digits 32 px, {args.method}, {args.epochs} epochs, batch 32, {args.threads} threads; "
        "variants calibrated on 4 training batches; latency: median of 10 after 3 warm-up\n"
    )
    print(
        "| backbone | variant | top-1 | accuracy drop (pp) | size (KiB) | size ratio "
        "| latency ratio b1 | latency ratio b32 | memory ratio b1 | label |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for backbone in BACKBONES:
        _, results = deployed(backbone, args.method, args.epochs, args.threads)
        ref = results["float"]
        for variant, r in results.items():
            if r["skipped"]:
                print(f"| {backbone} | {variant} | skipped: {r['skipped']} | | | | | | | |")
                continue
            label = "simulated" if r["simulated"] else "measured"
            print(
                f"| {backbone} | {variant} | {r['accuracy']:.3f} | "
                f"{100 * (ref['accuracy'] - r['accuracy']):+.1f} | "
                f"{r['size_mb'] * 1024:,.0f} | {r['size_mb'] / ref['size_mb']:.2f} | "
                f"{r['latency_ms_b1'] / ref['latency_ms_b1']:.2f} | "
                f"{r['latency_ms_batch'] / ref['latency_ms_batch']:.2f} | "
                f"{r['peak_mem_mb_b1'] / ref['peak_mem_mb_b1']:.2f} | {label} |"
            )
        print(
            f"| {backbone} | (float: {ref['latency_ms_b1']:.2f} ms b1, "
            f"{ref['latency_ms_batch']:.2f} ms b32, {ref['peak_mem_mb_b1']:.2f} MiB b1) "
            "| | | | | | | | |"
        )


if __name__ == "__main__":
    main()
