"""Flush bookkeeping: which records a `flush()` waits for, and when it is done.

The training thread asks (`flush(target, timeout)`: the first `target` records it put in the
buffer must be settled); the sender thread takes records from the buffer (`took`), settles
them (acknowledged, spooled or dropped: `settled`) and, once a round, asks `FlushLedger.due`
whether the waiting flush is done. No socket, no spool, no thread of its own: unit-tested
alone (tests/test_agent_sender_flush.py).

A flush is done when everything it waits for was taken from the buffer and either
- delivered: nothing is held, in flight or in the spool (`idle`), or
- durable: the spool is where the records go (no server url, a refused token, no spool
  at all) or where they must stay for now (`close()` given up on a host that refuses
  connections), and no live batch is in flight (a live batch goes to the spool when its
  connection is lost: it is not durable yet).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class FlushRequest:
    target: int  # records put in the buffer that must be settled
    deadline: float
    unreachable: bool = False  # a connection attempt made during this flush failed
    done: bool = False
    # close(): give up this long after connections began to be refused (nothing listens at the
    # address: ECONNREFUSED) once the records are in the synced spool; None: wait until deadline.
    give_up_refused: float | None = None
    started: float = 0.0

    def gives_up(self, refused_since: float | None, now: float) -> bool:
        """close() stops waiting for a host that has refused every connection for
        `give_up_refused` seconds (counted from this flush's start at the earliest)."""
        return (self.give_up_refused is not None and refused_since is not None
                and now - max(refused_since, self.started) >= self.give_up_refused)


class FlushLedger:
    """Records taken from the buffer (`taken`) and still held (`held`: not yet acknowledged,
    spooled or dropped), and the one flush waiting, behind one condition shared by the
    training thread and the sender thread."""

    def __init__(self):
        self.cond = threading.Condition()
        self.taken = 0
        self.held = 0
        self.request: FlushRequest | None = None

    def took(self, count: int) -> None:
        with self.cond:
            self.taken += count
            self.held += count

    def settled(self, count: int) -> None:
        with self.cond:
            self.held -= count

    def begin(self, target: int, timeout: float, give_up_refused: float | None = None) -> FlushRequest:
        now = time.monotonic()
        request = FlushRequest(target, now + max(0.0, timeout), give_up_refused=give_up_refused, started=now)
        with self.cond:
            self.request = request
        return request

    def wait(self, request: FlushRequest, alive: Callable[[], bool]) -> None:
        """Until `request` is done, its deadline passed, or the sender thread is gone."""
        with self.cond:
            while not request.done:
                remaining = request.deadline - time.monotonic()
                if remaining <= 0 or not alive():
                    break
                self.cond.wait(min(remaining, 0.05))
            if self.request is request:
                self.request = None

    def due(self, *, waiting: int, idle: bool, spool_is_destination: bool, live_in_flight: bool,
            refused_since: float | None, now: float) -> bool:
        """Is the waiting flush done? `waiting`: records in the buffer or an open batch."""
        request = self.request
        if request is None or request.done or waiting or self.taken < request.target:
            return False
        durable = ((spool_is_destination or request.gives_up(refused_since, now)) and not live_in_flight)
        return idle or durable

    def finish(self, request: FlushRequest | None = None) -> None:
        with self.cond:
            request = self.request if request is None else request
            if request is not None:
                request.done = True
            self.cond.notify_all()

    def complete(self, request: FlushRequest, *, pending: int, dropped: int, rejected: int, spooled: int,
                 offline: bool) -> bool:
        """Every record the flush waited for arrived (offline: is in the spool)."""
        return (request.done and self.taken >= request.target and pending == 0 and not dropped
                and not rejected and (offline or spooled == 0))
