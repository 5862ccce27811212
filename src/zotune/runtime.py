"""What a long run needs from the process it runs in: its peak memory, and stop signals turned into a flag.

Shared by the training loop (:mod:`zotune.train`) and the comparison grid (:mod:`zotune.compare`). torch
is imported only when a peak is measured, so that importing this module (and ``zotune.compare``) stays cheap.
"""

from __future__ import annotations

import resource
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["StopFlag", "peak_memory_mb"]


def peak_memory_mb(device: torch.device | None = None) -> float:
    """The peak memory of this process so far, in MiB.

    Args:
        device: a CUDA device: the CUDA allocator's peak on it; another device: the process's peak
            resident set. ``None``: the current CUDA device's peak if anything was allocated there,
            else the process's peak resident set.
    """
    import torch

    if device is None:
        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
            return torch.cuda.max_memory_allocated() / 2**20
    elif device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class StopFlag:
    """Within the context, the stop signals raise :attr:`requested` instead of ending the process.

    The handler only raises the flag; the loop checks it where stopping is safe (after a step, between
    polls: :meth:`check`), since raising from the handler could strike anywhere, half-way through a save
    or between starting a process and tracking it. SIGTERM is what job schedulers (Slurm's preemption,
    ``kill``, ``zotune compare`` stopping its cells) send before they kill a process: it only ever asks for the orderly stop, however often it
    comes. When SIGINT is among ``signals``, the first Ctrl-C asks for the orderly stop too and a second
    one raises ``KeyboardInterrupt`` at once. Outside the main thread (where Python cannot install
    handlers) the flag is never raised. The previous handlers are restored on exit.

    Args:
        signals: the signals to catch; default: Ctrl-C (SIGINT) and SIGTERM.

    Example::

        with StopFlag() as stop:
            while not stop.requested:
                train_one_step()
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.requested = False
        self._interrupts = 0  # Ctrl-Cs so far
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def _handle(self, signum, frame):
        self.requested = True
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a stop was requested (the caller's cue to stop as Ctrl-C would)."""
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            if previous is not None:  # None: the handler was not installed from Python, nothing to put back
                signal.signal(s, previous)
