"""SIGTERM and SIGINT ask for a checkpoint-and-stop; a second signal gives up at once."""

import os
import signal

import pytest

from unroll.train.signals import StopRequest


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
