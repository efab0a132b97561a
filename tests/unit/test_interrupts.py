"""SIGTERM / SIGINT as an exception at a safe point, and recognising a dead process."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from pipeline import interrupts


def _signal_self(sig=signal.SIGTERM):
    os.kill(os.getpid(), sig)


def test_a_signal_outside_deferred_work_raises_at_once():
    with pytest.raises(interrupts.Interrupted, match="interrupted by SIGTERM"):
        with interrupts.raising_on_signals():
            _signal_self()
            pytest.fail("the signal did not stop the work")


def test_inside_deferred_work_a_signal_waits_for_the_next_check():
    reached = []
    with pytest.raises(interrupts.Interrupted, match="SIGINT"):
        with interrupts.raising_on_signals(), interrupts.deferred():
            _signal_self(signal.SIGINT)
            reached.append("after the signal")  # a step is never cut in half
            interrupts.check()
            reached.append("after the check")
    assert reached == ["after the signal"] and interrupts.pending == []


def test_work_that_must_finish_whole_finishes_then_stops():
    done = []
    with pytest.raises(interrupts.Interrupted):
        with interrupts.raising_on_signals():
            with interrupts.deferred(check_on_exit=False):
                _signal_self()
                done.append("finished")
            done.append("after the block")  # e.g. the hand-off is written
    assert done == ["finished", "after the block"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_a_second_signal_gets_the_previous_handler():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(interrupts.Interrupted):
            with interrupts.raising_on_signals(), interrupts.deferred():
                _signal_self(signal.SIGINT)
                with pytest.raises(KeyboardInterrupt) as second:
                    _signal_self(signal.SIGINT)  # Python's own: stop now
                assert not isinstance(second.value, interrupts.Interrupted)
    finally:
        signal.signal(signal.SIGINT, previous)
        interrupts.pending.clear()


def test_a_process_is_gone_only_when_it_ran_here_and_no_longer_exists():
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert interrupts.gone(host, dead)
    assert not interrupts.gone(host, str(os.getpid()))
    assert not interrupts.gone("another-host", dead)  # cannot be checked from here
    assert not interrupts.gone(None, None)
