"""SIGTERM and SIGINT ask for a checkpoint-and-stop; a second signal gives up at once. The test hook
UNROLL_PAUSE_AT_STEP holds a rank at a known step until a signal comes."""

import os
import signal
import threading
import time

import pytest

from unroll.train.signals import PAUSE_AT_STEP, StopRequest, pause_for_signal, pause_marker


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_requests_stop_second_exits(sig):
    # Python's own SIGINT handler beneath, also where the parent left SIGINT ignored (a background job)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(sig)
    stop = StopRequest(repeat_window_s=0)
    try:
        assert not stop.requested
        os.kill(os.getpid(), sig)
        assert stop.requested and stop.signum == sig
        if sig == signal.SIGINT:  # the second one goes to the previous handler: KeyboardInterrupt here
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
    finally:
        stop.restore()
        assert signal.getsignal(sig) == before
        signal.signal(signal.SIGINT, inherited)


def test_preemption_signal_requests_stop_and_repeats_change_nothing():
    """SIGUSR1 (the SLURM preemption warning) arrives twice under torchrun: it must not escalate."""
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # default action would end this process
        assert stop.requested and stop.signum == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # a first SIGTERM after it is no second request either
        assert stop.signum == signal.SIGUSR1
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_repeat_within_the_window_is_the_same_request():
    """SLURM and torchrun's agent both deliver one SIGTERM to a rank: no escalation within the window."""
    stop = StopRequest(repeat_window_s=60)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
    finally:
        stop.restore()


def test_pause_hook_does_nothing_unless_its_step_is_named(monkeypatch, tmp_path):
    stop = StopRequest()
    try:
        monkeypatch.delenv(PAUSE_AT_STEP, raising=False)
        pause_for_signal(3, tmp_path, stop, rank=0)
        monkeypatch.setenv(PAUSE_AT_STEP, "4")
        pause_for_signal(3, tmp_path, stop, rank=0)
        pause_for_signal(5, tmp_path, stop, rank=0)
    finally:
        stop.restore()
    assert list(tmp_path.iterdir()) == [] and not stop.requested


def test_pause_hook_marks_the_step_and_waits_for_a_signal(monkeypatch, tmp_path):
    monkeypatch.setenv(PAUSE_AT_STEP, "3")
    marker = pause_marker(tmp_path, 3, rank=1)
    seen = []

    def signal_once_paused():
        deadline = time.monotonic() + 60  # bounds the wait only: a pause that never comes fails the test
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(marker.exists() and marker.read_text())
        os.kill(os.getpid(), signal.SIGUSR1)

    stop = StopRequest()
    signaller = threading.Thread(target=signal_once_paused)
    try:
        signaller.start()
        pause_for_signal(3, tmp_path, stop, rank=1)  # returns only once the signal has come
        assert stop.requested and stop.signum == signal.SIGUSR1
    finally:
        signaller.join()
        stop.restore()
    assert seen == [str(os.getpid())]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paused-at-step-3.rank1"]
