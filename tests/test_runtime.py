"""zotune.runtime: the peak-memory and stop-signal helpers the training loop and the comparison grid share."""

import os
import resource
import signal

import pytest
import torch

from zotune.runtime import StopFlag, peak_memory_mb


def test_peak_memory_off_the_gpu_is_the_resident_peak():
    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # the kernel's resident peak in MiB, read between two reads of it (a peak only grows): no tolerance needed
    before = rss()
    assert before <= peak_memory_mb(torch.device("cpu")) <= rss() and before > 0
    if not torch.cuda.is_available():
        before = rss()
        assert before <= peak_memory_mb() <= rss()


def test_a_sigterm_only_flag_leaves_ctrl_c_alone_and_check_stops():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopFlag((signal.SIGTERM,)) as stop:
        assert signal.getsignal(signal.SIGINT) is before[1]
        stop.check()  # nothing asked yet
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a second one is only the same request
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop.check()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_the_second_ctrl_c_interrupts_at_once():
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
