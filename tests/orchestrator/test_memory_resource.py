"""A CPU trial reserves its budget plus the RSS margin as Ray's ``memory`` resource: trials
run at once on a node only while their reservations fit it, and a budget no node can hold
is refused before anything runs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.grid import Resources
from orchestrator.records import RecordStore
from orchestrator.spec import TrainConfig, TrialSpec
from orchestrator.tune_driver import MIB, check_memory, memory_request, run_sweep
from workers.rss_limit import RSS_MARGIN_MB, RSS_MARGIN_SHARE

GIB = 1024 * MIB


def test_a_cpu_trial_reserves_its_budget_and_the_rss_margin() -> None:
    limit = 1024 + RSS_MARGIN_MB + RSS_MARGIN_SHARE * 1024  # what RssGuard stops it at
    assert memory_request(1024, gpus=0.0) == int(limit * MIB)
    assert memory_request(1024, gpus=0.25) == 0  # on its GPU share: device memory
    assert memory_request(1024, gpus=0.25, device="cpu") == int(limit * MIB)


def test_a_budget_no_node_can_hold_is_refused() -> None:
    check_memory({1024.0: 2 * GIB}, [1 * GIB, 3 * GIB])  # the larger node holds it
    with pytest.raises(ValueError, match=r"budget_mb=8192: .* 12800 MiB .* largest Ray node"):
        check_memory({1024.0: 2 * GIB, 8192.0: 12800 * MIB}, [3 * GIB, 4 * GIB])


@pytest.fixture
def small_node() -> Iterator[float]:
    """A local Ray node with 2 CPUs and 3 GiB of Ray ``memory``; stopped afterwards."""
    import ray

    from orchestrator.tune_driver import _loopback_node  # listen on loopback, as connect()

    if ray.is_initialized():
        ray.shutdown()
    with _loopback_node(True):
        ray.init(
            num_cpus=2, _memory=3 * GIB, object_store_memory=128 * MIB,
            include_dashboard=False, log_to_driver=False, configure_logging=False,
        )  # fmt: skip
    yield 3.0 * GIB
    ray.shutdown()


@pytest.mark.ray
def test_trials_whose_budgets_do_not_both_fit_the_node_run_one_at_a_time(
    small_node: float, tmp_path: Path
) -> None:
    import ray

    # each reserves 1024 + 1024 + 51 = 2,099 MiB: one fits the 3 GiB node, two do not
    data = {"num_classes": 4, "images_per_class": 24, "image_size": 16}
    train = TrainConfig(epochs=1, batch_size=16, max_steps=3)
    specs = [
        TrialSpec(backbone="vit_test", backbone_args={"img_size": 16}, method=method,
                  dataset="synthetic", dataset_args=data, budget_mb=1024, train=train)
        for method in ("full", "bitfit")
    ]  # fmt: skip
    free: list[float] = []
    done = threading.Event()

    def watch() -> None:  # Ray's view of the node's free memory while the sweep runs
        while not done.wait(0.05):
            free.append(ray.available_resources().get("memory", 0.0))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    store = RecordStore(str(tmp_path / "out"))
    try:
        outcome = run_sweep(
            specs, store, Resources(cpus_per_trial=1, max_concurrent=2), name="mem",
            show_progress=False,
        )  # fmt: skip
    finally:
        done.set()
        watcher.join()
    assert outcome.recorded == 2
    frame = store.collect().sort_values("started_at")
    assert (frame["status"] == "ok").all(), frame["error"].tolist()
    first, second = frame.itertuples()
    assert first.ended_at <= second.started_at  # one at a time, though two CPUs were free
    assert min(free) == pytest.approx(small_node - memory_request(1024, 0.0), abs=MIB)
