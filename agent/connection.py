"""When to try connecting, and the attempt itself off the sender's loop.

`Backoff` is pure (the clock and the jitter are passed in): jittered
exponential delays between failed attempts, reset by a success, and `now()`
for a caller that must not wait for the next slot (`flush()`/`close()` with
records waiting, or a server that is surely there after a "message too big").

`Connector` runs `transport.open()` in a short-lived helper thread, so a
server that is slow to answer the handshake never stops the sender from
draining the buffer into the spool meanwhile.
"""
from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Callable

from .transport import Refused, TransportError, WebSocketTransport


@dataclass
class Backoff:
    base: float = 0.1
    cap: float = 30.0
    failures: int = 0  # failed attempts in a row
    next_attempt: float = 0.0  # monotonic time of the next allowed attempt
    jitter: Callable[[], float] = field(default=random.random, repr=False)

    def due(self, now: float) -> bool:
        return now >= self.next_attempt

    def failed(self, now: float) -> float:
        """One more failed attempt: the next is due after a jittered delay (returned)."""
        self.failures += 1
        delay = min(self.cap, self.base * 2 ** min(self.failures, 30))
        delay *= 0.5 + 0.5 * self.jitter()
        self.next_attempt = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.next_attempt = 0.0

    def soon(self, now: float) -> None:
        """Try again after a short pause, without counting a failure."""
        self.next_attempt = now + self.base * (0.5 + 0.5 * self.jitter())

    def now(self, now: float) -> None:
        """The next attempt is due at once."""
        self.next_attempt = min(self.next_attempt, now)


class Connector:
    """One connection attempt at a time, in a helper thread; the sender polls `take()`."""

    def __init__(self, transport: WebSocketTransport, on_done: Callable[[], None]):
        self.transport = transport
        self._on_done = on_done  # wakes the sender
        self._thread: threading.Thread | None = None
        self._outcome = None  # a connection, or the exception of the attempt
        self._lock = threading.Lock()
        self._shut = False

    @property
    def busy(self) -> bool:
        """An attempt is running or its outcome waits to be taken."""
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None or self._shut:
            return
        self._thread = threading.Thread(target=self._attempt, name="gradwatch-connect", daemon=True)
        self._thread.start()

    def take(self):
        """None while no attempt ended; else the new connection or the exception it raised."""
        thread = self._thread
        if thread is None or thread.is_alive():
            return None
        self._thread = None
        with self._lock:
            outcome, self._outcome = self._outcome, None
        return outcome

    def shut(self) -> None:
        """No more attempts; a connection made after this is closed, not handed over."""
        with self._lock:
            self._shut = True
            outcome, self._outcome = self._outcome, None
        if outcome is not None and not isinstance(outcome, BaseException):
            self.transport.discard(outcome)

    def _attempt(self) -> None:
        try:
            outcome = self.transport.open()
        except (Refused, TransportError) as error:
            outcome = error
        except Exception as error:  # anything else is a failed attempt too, not a dead thread
            outcome = TransportError(f"cannot connect to {self.transport.url}: {error!r}")
        with self._lock:
            if self._shut:
                if not isinstance(outcome, BaseException):
                    self.transport.discard(outcome)
                return
            self._outcome = outcome
        self._on_done()
