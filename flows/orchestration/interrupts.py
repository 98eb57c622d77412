"""Ctrl-C and SIGTERM as a clean stop that cannot get lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when the signal arrives; deep
in TensorFlow, an event loop or a finalizer it can be swallowed, and a Ctrl-C typed during a long
training was seen to change nothing. So while a training runs, every SIGINT and SIGTERM is noted
before the handler in place (Python's, Prefect's, the CLI's) runs, and the training checks after
each batch: a stop that was swallowed is raised again there. SIGTERM without a handler of its own
becomes `Interrupted` (a clean stop, exit code 143) instead of killing the process mid-write.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from cnnflow.components.errors import Interrupted

_received: list[int] = []


def _raise_for(signal_number: int) -> None:
    raise Interrupted() if signal_number == signal.SIGTERM else KeyboardInterrupt()


def terminate_cleanly() -> None:
    """SIGTERM stops like Ctrl-C for the rest of the process (the CLI calls it at start)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda number, frame: _raise_for(number))


@contextlib.contextmanager
def noted():
    """Within the block, SIGINT and SIGTERM are noted before their handler runs (main thread only;
    elsewhere the block does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def note(number, frame):
        _received.append(number)
        handler = previous[number]
        if callable(handler):
            handler(number, frame)
        elif handler != signal.SIG_IGN:
            _raise_for(number)

    for number in previous:
        signal.signal(number, note)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _received.clear()


def raise_if_received() -> None:
    """Raise the stop for a signal noted in this block, again if it was swallowed the first time."""
    if _received:
        _raise_for(_received[0])
