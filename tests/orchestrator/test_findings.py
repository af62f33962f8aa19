"""Findings on record tables whose answers are known by construction: each method against
full, each checkpointing strategy against none, what fits the budget, the best baseline
against the best fine-tuned configuration, and what is omitted when trials are lacking."""

from __future__ import annotations

import pandas as pd
import pytest

from orchestrator import pareto
from orchestrator.report.findings import findings, percent, points

# (backbone, method, checkpointing) -> (accuracies per seed, peak MiB, energy J, train s);
# None: every seed over budget.
TUNED = {
    ("vit_s", "full", "none"): ((0.89, 0.90, 0.91), 1000.0, 1000.0, 100.0),
    ("vit_s", "qlora", "none"): ((0.87, 0.88, 0.89), 400.0, 750.0, 110.0),
    ("vit_s", "bitfit", "none"): ((0.885, 0.895, 0.905), 300.0, 800.0, 90.0),
    ("vit_s", "full", "adaptive"): ((0.885, 0.895, 0.905), 210.0, 1300.0, 130.0),
    ("vit_s", "qlora", "adaptive"): ((0.87, 0.88, 0.89), 228.0, 817.5, 143.0),
    ("vit_s", "full", "static"): None,
}


def _row(dataset: str, backbone: str, method: str, ckpt: str, seed: int, **values) -> dict:
    base = {
        "trial_id": f"{dataset[:2]}-{method}-{ckpt}-{seed}",
        "kind": "finetune",
        "status": "ok",
        "error": "",
        "backbone": backbone,
        "method": method,
        "baseline": "",
        "checkpointing": ckpt,
        "dataset": dataset,
        "seed": seed,
        "budget_mb": 2048.0,
        "energy_source": "nvml_energy",
        "energy_exclusive": True,
    }
    return {**base, **values}


def paper_like_records() -> pd.DataFrame:
    """cifar100: the table above plus a DINOv2 k-NN baseline (0.917 on every seed, 100 J,
    10 s); dtd: full fine-tuning alone, one seed."""
    rows = []
    for (backbone, method, ckpt), values in TUNED.items():
        for seed in range(3):
            if values is None:
                rows.append(_row("cifar100", backbone, method, ckpt, seed, status="over_budget"))
                continue
            accs, mem, energy, time = values
            measured = dict(
                accuracy=accs[seed], peak_mem_mb=mem, energy_j=energy, train_time_s=time
            )
            rows.append(_row("cifar100", backbone, method, ckpt, seed, **measured))
    for seed in range(3):
        rows.append(
            _row(
                "cifar100",
                "vit_small_patch14_dinov2",
                "",
                "none",
                seed,
                trial_id=f"ci-knn-{seed}",
                kind="baseline",
                baseline="dinov2_knn",
                accuracy=0.917,
                peak_mem_mb=500.0,
                energy_j=100.0,
                train_time_s=10.0,
            )
        )
    one = dict(accuracy=0.6, peak_mem_mb=900.0, energy_j=50.0, train_time_s=5.0)
    rows.append(_row("dtd", "vit_s", "full", "none", 0, **one))
    return pd.DataFrame(rows)


# The statements, with every number worked out by hand from TUNED.
EXPECTED = {
    # qlora / none vs full / none: 750/1000, 400/1000, 110/100, 0.88 - 0.90;
    # qlora / adaptive vs full / adaptive: 817.5/1300 = 0.629, 228/210 = 1.086, 143/130,
    # 0.88 - 0.895
    "qlora vs full: energy −37 to −25 %, peak memory −60 to +8.6 %, train time +10 %, "
    "accuracy −2.0 to −1.5 points, over 2 pairs of the same backbone, checkpointing and "
    "budget (12 trials)": (),
    # 800/1000, 300/1000, 90/100, 0.895 - 0.90 (inside the std of 0.01)
    "bitfit vs full: energy −20 %, peak memory −70 %, train time −10 %, accuracy −0.5 points, "
    "over 1 pair of the same backbone, checkpointing and budget (6 trials)": (
        "the accuracy change is inside one seed standard deviation in the pair",
    ),
    # full: 210/1000, 1300/1000, 130/100, 0.895 - 0.90; qlora: 228/400 = 0.57,
    # 817.5/750 = 1.09, 143/110 = 1.3, 0.88 - 0.88
    "adaptive vs none: peak memory −79 to −43 %, energy +9.0 to +30 %, train time +30 %, "
    "accuracy −0.5 to +0.0 points, over 2 pairs of the same backbone, method and budget "
    "(12 trials)": ("the accuracy change is inside one seed standard deviation in all 2 pairs",),
    "6 of 7 configurations fit the 2048 MiB budget (every trial ok); over it: "
    "vit_s / full / static @ 2048 MiB (over_budget 3)": (),
    # 0.917 - 0.900; 100/1000; 10/100
    "best baseline vit_small_patch14_dinov2 / dinov2_knn / none @ 2048 MiB 0.917 ± 0.000 vs "
    "best fine-tuned vit_s / full / none @ 2048 MiB 0.900 ± 0.010: +1.7 points, "
    "energy −90 %, train time −90 % (6 trials)": (),
}


def test_paper_like_statements_with_hand_computed_numbers() -> None:
    found = findings(paper_like_records())
    cifar = {f.text: f for f in found.found if f.dataset == "cifar100"}
    assert set(cifar) == set(EXPECTED)
    for text, caveats in EXPECTED.items():
        assert cifar[text].caveats == caveats, text
    topics = {f.text.split(" vs ")[0]: f.topic for f in found.found if " vs " in f.text}
    assert topics == {
        "qlora": "methods",
        "bitfit": "methods",
        "adaptive": "checkpointing",
        "best baseline vit_small_patch14_dinov2 / dinov2_knn / none @ 2048 MiB 0.917 ± 0.000": (
            "baselines"
        ),
    }


def test_each_statement_names_the_trials_it_rests_on() -> None:
    found = {f.text.split(":")[0]: f for f in findings(paper_like_records()).found}
    bitfit = found["bitfit vs full"]
    assert bitfit.trials == tuple(
        sorted(f"ci-{m}-none-{s}" for m in ("bitfit", "full") for s in range(3))
    )
    adaptive = found["adaptive vs none"]
    assert len(adaptive.trials) == 12 and "ci-qlora-adaptive-2" in adaptive.trials
    assert "ci-full-static-0" not in adaptive.trials  # over budget: not a comparison
    # one detail line per pair, with both accuracies as mean ± std
    assert adaptive.details == (
        "vit_s / full / adaptive vs none @ 2048 MiB: peak memory −79 %, energy +30 %, "
        "train time +30 %, accuracy 0.895 ± 0.010 vs 0.900 ± 0.010 (−0.5 points)",
        "vit_s / qlora / adaptive vs none @ 2048 MiB: peak memory −43 %, energy +9.0 %, "
        "train time +30 %, accuracy 0.880 ± 0.010 vs 0.880 ± 0.010 (+0.0 points)",
    )
    budget = next(f for f in findings(paper_like_records()).found if f.topic == "budget")
    assert "ci-full-static-1" in budget.trials and len(budget.trials) == 21


def test_statements_a_sweep_lacks_the_trials_for_are_omitted_with_the_reason() -> None:
    found = findings(paper_like_records())
    omitted = {(o.topic, o.dataset): o.why for o in found.omitted}
    assert omitted == {
        ("checkpointing", "cifar100"): "static: no trial finished ok",
        ("methods", "dtd"): "only method full ran: nothing to compare with it",
        ("checkpointing", "dtd"): "only checkpointing none ran: nothing to compare with it",
        ("baselines", "dtd"): "no training-free baseline finished ok",
    }
    dtd = [f.text for f in found.found if f.dataset == "dtd"]
    assert dtd == ["1 of 1 configurations fit the 2048 MiB budget (every trial ok)"]
    lines = found.lines()
    assert "not stated (Checkpointing against none): cifar100: static: no trial finished ok" in (
        lines
    )


def test_no_reference_and_no_shared_configuration_are_said() -> None:
    records = paper_like_records()
    no_full = records[records["method"] != "full"]
    why = {o.topic: o.why for o in findings(no_full).omitted if o.dataset == "cifar100"}
    assert why["methods"] == "no method full trial finished ok: methods are compared with it"
    # lora on another backbone: nothing of full's shares its backbone
    extra = _row("cifar100", "vit_b", "lora", "none", 0, accuracy=0.9, peak_mem_mb=1.0)
    omitted = findings(pd.concat([records, pd.DataFrame([extra])], ignore_index=True)).omitted
    assert (
        "lora: no ok configuration shares backbone, checkpointing and budget with an ok full one"
        in {o.why for o in omitted}
    )


def test_one_seed_and_estimated_energy_are_caveats() -> None:
    records = paper_like_records()
    single = records[(records["seed"] == 0) & (records["dataset"] == "cifar100")].copy()
    single.loc[single["method"] == "bitfit", "energy_source"] = "estimated"
    found = {f.text.split(":")[0]: f for f in findings(single).found}
    assert found["bitfit vs full"].caveats == (
        "the pair has one seed: the accuracy change cannot be told from seed noise",
        "energy estimated from CPU time, not measured",
    )
    assert found["qlora vs full"].caveats[0].startswith("all 2 pairs have one seed")
    # one seed: the mean alone, no spread
    base = next(f for f in findings(single).found if f.topic == "baselines")
    assert "0.917 vs best fine-tuned vit_s / full / none @ 2048 MiB 0.890:" in base.text


@pytest.mark.parametrize(
    ("change", "text"),
    [(-0.25, "−25"), (0.09, "+9.0"), (0.0995, "+10"), (-0.0004, "−0.0"), (2.0, "+200")],
)
def test_percent(change: float, text: str) -> None:
    assert percent(change) == text


def test_points() -> None:
    assert points(0.917 - 0.9) == "+1.7" and points(-0.015) == "−1.5"


def test_a_long_trial_list_is_shortened_in_the_pages() -> None:
    budget = next(f for f in findings(paper_like_records()).found if f.topic == "budget")
    assert len(budget.trials) == 21
    assert budget.trial_list(limit=2) == "ci-bitfit-none-0, ci-bitfit-none-1, … and 19 more"
    assert budget.trial_list() == ", ".join(budget.trials)


def test_configurations_that_differ_in_an_argument_are_not_averaged_together() -> None:
    """A grid axis over the learning rate: two configurations per method, each compared
    with the full fine-tuning at its own learning rate, never a mean over both."""
    rows = []
    for lr, (full_acc, lora_acc, lora_energy) in {
        1e-3: (0.9, 0.8, 500.0),
        1e-4: (0.7, 0.75, 600.0),
    }.items():
        for seed in range(2):
            common = {"train.lr": lr, "peak_mem_mb": 100.0, "train_time_s": 10.0}
            rows.append(
                _row("digits", "vit_t", "full", "none", seed, trial_id=f"f-{lr}-{seed}",
                     accuracy=full_acc, energy_j=1000.0, **common)
            )  # fmt: skip
            rows.append(
                _row("digits", "vit_t", "lora", "none", seed, trial_id=f"l-{lr}-{seed}",
                     accuracy=lora_acc, energy_j=lora_energy, **{"method.r": 8}, **common)
            )  # fmt: skip
    records = pd.DataFrame(rows)
    means = pareto.aggregate_seeds(records)
    assert len(means) == 4
    lora = means[means["method"] == "lora"].set_index("train.lr")
    assert lora.loc[1e-3, "accuracy"] == pytest.approx(0.8)
    assert lora.loc[1e-4, "config"] == "vit_t / lora / none @ 2048 MiB [lr=0.0001, r=8]"
    lora_vs_full = next(f for f in findings(records).found if f.text.startswith("lora vs full"))
    # the pairs share the learning rate: energy -50 % at 1e-3 and -40 % at 1e-4
    assert lora_vs_full.details == (
        "vit_t / lora vs full / none @ 2048 MiB [lr=0.0001]: energy −40 %, peak memory +0.0 %, "
        "train time +0.0 %, accuracy 0.750 ± 0.000 vs 0.700 ± 0.000 (+5.0 points)",
        "vit_t / lora vs full / none @ 2048 MiB [lr=0.001]: energy −50 %, peak memory +0.0 %, "
        "train time +0.0 %, accuracy 0.800 ± 0.000 vs 0.900 ± 0.000 (−10.0 points)",
    )
