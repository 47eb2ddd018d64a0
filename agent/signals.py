"""SIGTERM and SIGINT flush the watches, then do what the signal would have done.

Schedulers and `kill` stop a job with SIGTERM, and `atexit` does not run
then: the records still in memory would be lost. The handler gives every
live watch its `close_timeout` to deliver (or spool) what it holds, and then
hands the signal on: to the handler that was there before (the user's, or
Python's own SIGINT handler that raises `KeyboardInterrupt`); when that was
the default action, the default is restored and the signal raised again, so
the process ends as it would have (killed by SIGTERM, exit status -15);
when it was "ignore", nothing more happens.

Installed once per process, only from the main thread (Python allows no
other), and only for a signal whose handler is still the one we found when
first installing (a handler the user sets later replaces ours, as they
asked). `GradWatch(handle_signals=False)` never calls `install`.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_previous: dict[int, object] = {}  # signal -> the handler found when we installed ours
_on_signal: Callable[[int, bool], None] | None = None


def install(on_signal: Callable[[int, bool], None]) -> bool:
    """Route SIGTERM and SIGINT through `on_signal(signum, ends_process)` first. False (and
    nothing installed) outside the main thread."""
    global _on_signal
    if threading.current_thread() is not threading.main_thread():
        return False
    _on_signal = on_signal
    for signum in SIGNALS:
        if signum in _previous and signal.getsignal(signum) is _handler:
            continue
        try:
            previous = signal.getsignal(signum)
            signal.signal(signum, _handler)
        except (ValueError, OSError):  # not the main interpreter, or an unsupported signal
            continue
        _previous[signum] = previous
    return True


def installed(signum: int) -> bool:
    return signal.getsignal(signum) is _handler


def _ends_process(previous) -> bool:
    return previous in (signal.SIG_DFL, None)


_handling = False  # a second signal during the flush goes on at once (a second Ctrl-C means now)


def _handler(signum: int, frame) -> None:
    global _handling
    previous = _previous.get(signum, signal.SIG_DFL)
    callback = _on_signal
    if callback is not None and previous is not signal.SIG_IGN and not _handling:
        _handling = True
        try:
            callback(signum, _ends_process(previous))
        except Exception:  # delivering is best effort; the signal must still take effect
            pass
        finally:
            _handling = False
    if callable(previous):
        previous(signum, frame)
    elif _ends_process(previous):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
