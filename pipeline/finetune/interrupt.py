"""Ctrl-C during training: finish the optimizer step, then stop where a checkpoint can be saved."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Stop:
    requested: bool = False


@contextmanager
def deferred_interrupt():
    """Yield a Stop whose `requested` turns True on the first SIGINT; a second one interrupts
    at once. Outside the main thread (no signal handlers there) nothing changes."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(_sig, _frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
