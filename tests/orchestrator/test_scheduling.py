"""What a trial asks Ray for: GPU shares packed by memory budget, whole GPUs for energy."""

from __future__ import annotations

import pytest

from orchestrator.grid import Resources
from orchestrator.tune_driver import check_resources, gpu_exclusive, gpu_share, gpus_per_budget


@pytest.mark.parametrize(
    ("budget", "gpu", "context", "share"),
    [
        (2048, 81920, 512, 1 / 32),  # 80 GiB: 32 trials of 2.5 GiB
        (2048, 24576, 500, 1 / 9),  # 24 GiB: 9 x 2548 MiB = 22932, a 10th does not fit
        (2048, 4096, 500, 1.0),  # one trial per 4 GiB GPU
        (8000, 81920, 0, 1 / 10),
    ],
)
def test_gpu_share_packs_budgets_and_contexts(
    budget: float, gpu: float, context: float, share: float
) -> None:
    assert gpu_share(budget, gpu, context) == pytest.approx(share)
    k = round(1 / share)
    assert k * (budget + context) <= gpu < (k + 1) * (budget + context)


def test_gpu_share_names_a_budget_that_no_gpu_holds() -> None:
    with pytest.raises(ValueError, match=r"needs 4596 MiB \(budget 4096 \+ CUDA context 500\)"):
        gpu_share(4096, 4000, 500)


def test_gpus_per_budget() -> None:
    probe_calls = []

    def probe() -> tuple[float, float]:
        probe_calls.append(1)
        return 24576.0, 500.0

    auto = Resources(gpus_per_trial="auto")
    shares = gpus_per_budget({2048.0, 4096.0}, auto, {}, cluster_gpus=4, probe=probe)
    assert shares == {"2048.0": pytest.approx(1 / 9), "4096.0": pytest.approx(1 / 5)}
    assert len(probe_calls) == 1  # one probe for the sweep
    # no GPU in the cluster: CPU trials, nothing probed
    assert gpus_per_budget({2048.0}, auto, {}, cluster_gpus=0, probe=probe) == {"2048.0": 0.0}
    assert len(probe_calls) == 1
    # exclusive energy: a whole GPU each, whatever the grid's number
    fixed = Resources(gpus_per_trial=0.25)
    assert gpus_per_budget({2048.0}, fixed, {"exclusive": True}, 2) == {"2048.0": 1.0}
    assert gpus_per_budget({2048.0}, fixed, {}, 2) == {"2048.0": 0.25}


def test_exclusive_label_follows_the_share() -> None:
    assert (gpu_exclusive(0.0), gpu_exclusive(0.25), gpu_exclusive(1.0)) == (None, False, True)


def test_auto_is_accepted_and_checked_later() -> None:
    check_resources(Resources(gpus_per_trial="auto"), {"CPU": 2})  # no GPU: CPU trials
    with pytest.raises(ValueError, match="gpus_per_trial=2 but the Ray cluster has 1 GPUs"):
        check_resources(Resources(gpus_per_trial=2), {"CPU": 2, "GPU": 1})
    with pytest.raises(ValueError, match="a number in \[0, 64\] or 'auto', got 'some'"):
        Resources(gpus_per_trial="some")


def test_live_metrics_are_ray_gauges_tagged_by_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.util.metrics

    from orchestrator.spec import TrialSpec
    from orchestrator.tune_driver import LiveMetrics

    made: dict[str, list] = {}

    class FakeGauge:
        def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]) -> None:
            self.tag_keys = tag_keys
            made[name] = []

        def set(self, value: float, tags: dict[str, str]) -> None:
            assert set(tags) == set(self.tag_keys)
            made[self.name].append((value, tags))

    def gauge(name: str, **kw: object) -> FakeGauge:
        g = FakeGauge(name, **kw)  # type: ignore[arg-type]
        g.name = name  # type: ignore[attr-defined]
        return g

    monkeypatch.setattr(ray.util.metrics, "Gauge", gauge)
    spec = TrialSpec(backbone="vit_test", seed=3)
    live = LiveMetrics(spec)
    live({"step": 4, "loss": 1.5, "peak_mem_mb": 12.0, "energy_j": 0.25})
    assert sorted(made) == [
        "vramsweep_trial_energy_j",
        "vramsweep_trial_loss",
        "vramsweep_trial_peak_mem_mb",
        "vramsweep_trial_step",
    ]
    tags = {"trial_id": spec.trial_id, "trial": spec.label}
    assert made["vramsweep_trial_step"] == [(4.0, tags)]
    assert made["vramsweep_trial_energy_j"] == [(0.25, tags)]
