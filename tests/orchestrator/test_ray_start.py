"""A local Ray's start: ``ray.init`` learns that its node has registered as soon as it
has (``_prompt_registration``), through Ray's private ``services.get_node``; a SIGTERM
meanwhile reaches the process's own handler (``_sigterm_kept``)."""

from __future__ import annotations

import os
import signal
from types import FrameType

import pytest
import ray

from orchestrator import tune_driver
from orchestrator.tune_driver import _await_registration, _sigterm_kept, connect, disconnect


def test_a_local_start_waits_for_its_node_by_our_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ray.init`` asks through ``services.get_node`` (if Ray stops calling it, the poll
    is dead code and this fails) and the poll sees the node; afterwards Ray's function
    is back in place."""
    from ray._private import services

    ray_get_node = services.get_node
    polls: list[tuple[str, bool]] = []

    def spy(gcs_address: str, node_id: str, timeout_s: float = 10.0) -> bool:
        polls.append((node_id, _await_registration(gcs_address, node_id, timeout_s)))
        return polls[-1][1]

    monkeypatch.setattr(tune_driver, "_await_registration", spy)
    try:
        connect(warm_workers=False)
        node_id = ray.get_runtime_context().get_node_id()
    finally:
        disconnect()
    assert polls == [(node_id, True)]
    assert services.get_node is ray_get_node


def test_the_poll_tells_a_registered_node_from_an_unknown_one() -> None:
    connect(warm_workers=False)
    try:
        gcs = ray.get_runtime_context().gcs_address
        node_id = ray.get_runtime_context().get_node_id()
        assert _await_registration(gcs, node_id, timeout_s=5)
        unknown = "f" * len(node_id)
        assert not _await_registration(gcs, unknown, timeout_s=0.2)
    finally:
        disconnect()


def test_a_process_already_on_ray_does_not_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a start polls: a process already connected stays on its Ray."""
    calls: list[str] = []
    monkeypatch.setattr(tune_driver, "_await_registration", lambda *a, **k: calls.append("x"))
    ray.init(num_cpus=1, include_dashboard=False)  # a Ray that connect did not start
    try:
        connect(warm_workers=False)
    finally:
        disconnect()
    assert calls == []


def test_a_sigterm_while_ray_starts_reaches_the_process_own_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real SIGTERM sent in the middle of ``ray.init`` (as it waits for its node): the
    process's handler gets it, where Ray's own would have exited with status 15."""
    received: list[int] = []

    def own(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    handlers: list[object] = []

    def spy(gcs_address: str, node_id: str, timeout_s: float = 10.0) -> bool:
        handlers.append(signal.getsignal(signal.SIGTERM))
        os.kill(os.getpid(), signal.SIGTERM)
        return _await_registration(gcs_address, node_id, timeout_s)

    monkeypatch.setattr(tune_driver, "_await_registration", spy)
    before = signal.signal(signal.SIGTERM, own)
    try:
        connect(warm_workers=False)
        assert signal.getsignal(signal.SIGTERM) is own  # and after the start
    finally:
        disconnect()
        signal.signal(signal.SIGTERM, before)
    assert handlers == [own]
    assert received == [signal.SIGTERM]


def test_a_process_without_a_sigterm_handler_keeps_ray_s() -> None:
    from ray._private import utils

    rays = utils.set_sigterm_handler
    with _sigterm_kept(signal.SIG_DFL):
        assert utils.set_sigterm_handler is rays
    with _sigterm_kept(lambda signum, frame: None):
        assert utils.set_sigterm_handler is not rays
    assert utils.set_sigterm_handler is rays
