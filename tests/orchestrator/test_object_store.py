"""``resources.object_store_mb`` sizes a local Ray's object store, so that its ``memory``
resource (what CPU trials reserve) is the rest of the node's available memory."""

from __future__ import annotations

import pytest

from orchestrator.grid import Resources
from orchestrator.tune_driver import MIB, connect, disconnect


@pytest.mark.parametrize("value", [10, -1, 1e8, "1 GiB", float("nan")])
def test_an_object_store_ray_cannot_have_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="object_store_mb must be 0"):
        Resources(object_store_mb=value)  # type: ignore[arg-type]


@pytest.mark.ray
def test_a_local_ray_gets_the_object_store_of_the_grid() -> None:
    import ray

    disconnect()
    small = connect(object_store_mb=128).resources
    disconnect()
    default = connect().resources
    disconnect()
    assert small["object_store_memory"] == pytest.approx(128 * MIB, abs=MIB)
    assert default["object_store_memory"] > 4 * small["object_store_memory"]
    # what the smaller store leaves is Ray's `memory`, which trials reserve (the node's
    # available memory, which other processes move between the two starts, less the store)
    gained = small["memory"] - default["memory"]
    shrunk = default["object_store_memory"] - small["object_store_memory"]
    assert gained > shrunk / 2
    assert not ray.is_initialized()
