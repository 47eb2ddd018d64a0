"""The sender's connection as a state machine: when to try, and what each outcome means.

Pure: no socket, no thread, the clock passed in; the sender runs the attempts (`Connector`)
and the transport, and tells the link what happened. Unit-tested alone
(tests/test_agent_sender_link.py).

States and transitions::

    OFFLINE   no server url: the spool is the destination, nothing is ever tried
    DOWN      not connected ── due(now) ──▶ attempt() ──▶ CONNECTING
    CONNECTING ── connected() ──▶ UP
               ── failed(now, nobody_listening) ──▶ DOWN (backoff; "refused by the host" noted)
               ── refused(reason) ──▶ REFUSED
    UP        ── lost(now, soon) ──▶ DOWN (soon: a server surely there, e.g. after a 1009)
              ── refused(reason) ──▶ REFUSED
    REFUSED   the server refused our token, or nothing takes batches at the URL's path:
              never tried again (records stay in the spool for `gradwatch push`)

While a flush waits (`flushing`), an attempt is due every `FLUSH_RETRY` seconds whatever the
backoff says; while the sender stops, only if no attempt failed yet.
"""
from __future__ import annotations

import enum

from .connection import Backoff

FLUSH_RETRY = 0.25  # seconds between connection attempts while a flush waits


class LinkState(enum.Enum):
    OFFLINE = "offline"
    DOWN = "down"
    CONNECTING = "connecting"
    UP = "up"
    REFUSED = "refused"


class Link:
    def __init__(self, backoff: Backoff | None = None, offline: bool = False):
        self.backoff = backoff if backoff is not None else Backoff()
        self.state = LinkState.OFFLINE if offline else LinkState.DOWN
        self.refused_reason: str | None = None
        # Since when every attempt was refused by the host (ECONNREFUSED: nothing listens);
        # None after any other outcome.
        self.refused_since: float | None = None
        self._flush_retry_at = 0.0

    @property
    def failures(self) -> int:
        """Failed attempts in a row."""
        return self.backoff.failures

    def due(self, now: float, *, flushing: bool = False, stopping: bool = False) -> bool:
        """Should an attempt start now?"""
        if self.state is not LinkState.DOWN or (stopping and self.failures > 0):
            return False
        return now >= self.next_attempt(flushing)

    def next_attempt(self, flushing: bool = False) -> float:
        """When the next attempt is due (monotonic seconds), in state DOWN."""
        due = self.backoff.next_attempt
        return min(due, self._flush_retry_at) if flushing else due

    def attempt(self, now: float) -> None:
        self.state = LinkState.CONNECTING
        self._flush_retry_at = now + FLUSH_RETRY

    def connected(self) -> None:
        self.state = LinkState.UP
        self.refused_since = None
        self.backoff.succeeded()

    def failed(self, now: float, nobody_listening: bool = False) -> bool:
        """A failed attempt (or a connection lost for an ordinary reason): back off. True
        when it is the first failure in a row."""
        if nobody_listening:
            self.refused_since = now if self.refused_since is None else self.refused_since
        else:
            self.refused_since = None
        if self.state is not LinkState.REFUSED:
            self.state = LinkState.DOWN
        self.backoff.failed(now)
        return self.failures == 1

    def lost(self, now: float, soon: bool) -> None:
        """The connection ended: try again `soon` (the server is surely there), else back off."""
        if soon:
            if self.state is not LinkState.REFUSED:
                self.state = LinkState.DOWN
            self.backoff.soon(now)
        else:
            self.failed(now)

    def refused(self, reason: str) -> None:
        self.state = LinkState.REFUSED
        self.refused_reason = reason

    def away(self) -> bool:
        """Records cannot go to the server now: no url, refused, or the last attempt failed
        (before the first attempt the server is not "away")."""
        return (self.state in (LinkState.OFFLINE, LinkState.REFUSED)
                or (self.state is not LinkState.UP and self.failures > 0))

    def gave_up_on(self) -> float | None:
        """`refused_since` while not connected (what close() may give up on), else None."""
        return None if self.state is LinkState.UP else self.refused_since
