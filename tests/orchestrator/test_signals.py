"""SIGINT and SIGTERM as stop requests: raised at once, or held for a loop to wind down."""

from __future__ import annotations

import os
import signal

import pytest

from orchestrator.signals import Interrupted, StopSignals


def _send(signum: int) -> None:
    os.kill(os.getpid(), signum)  # the handler runs in this (main) thread right after


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_outside_a_loop_raises_at_once(signum: int, status: int) -> None:
    with pytest.raises(Interrupted) as stopped, StopSignals():
        _send(signum)
        pytest.fail("the signal did not interrupt")
    assert stopped.value.exit_status == status
    assert str(stopped.value) == signal.Signals(signum).name


def test_a_held_loop_sees_the_request_and_a_second_signal_raises() -> None:
    with StopSignals() as stop:
        with stop.held():
            _send(signal.SIGTERM)
            assert stop.requested and stop.signum == signal.SIGTERM
            with pytest.raises(Interrupted) as again:
                _send(signal.SIGINT)
        assert again.value.signum == signal.SIGTERM  # the first signal names the exit
        with pytest.raises(Interrupted):
            stop.check()


def test_handlers_are_given_back() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert {s: signal.getsignal(s) for s in before} == before
