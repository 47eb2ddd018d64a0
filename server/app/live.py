"""Live feed: push newly stored points to `/ws/live/{run}` subscribers.

In one process, ingest publishes to the subscribers right after its commit:
each update is encoded once and queued as bytes for every subscriber, whose
backlog is bounded in bytes (`Subscriber`): a dashboard that stops reading gets
its backlog dropped and one `{"type": "resync", "run": ...}` message, then new
updates again.
Across processes (several workers or hosts on one PostgreSQL database), every
ingest transaction also sends `NOTIFY gradwatch_live` with the run and the
range of new steps; PostgreSQL delivers it only when the transaction commits.
Each process listens on one connection and, when one of its own dashboards
follows that run, reads those steps and pushes them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections import deque
from typing import Any, Callable

import numpy as np
import orjson
from fastapi import WebSocket

from gradwatch.server.storage.registry import LIVE_FIELDS
from gradwatch.server.app.security import presented_token, token_status
from gradwatch.server.storage import encode_series

LIVE_CHANNEL = "gradwatch_live"
PROCESS_TOKEN = f"{os.getpid()}-{os.urandom(4).hex()}"

log = logging.getLogger("gradwatch.server")
QUEUE_BYTES = 4 * 2**20   # default bound of one subscriber's backlog (Settings.live_queue_bytes)


def resync_message(run: str) -> bytes:
    """What a subscriber that fell behind gets instead of its backlog: refetch the run."""
    return orjson.dumps({"type": "resync", "run": run})


class Subscriber:
    """One `/ws/live` socket's backlog: encoded messages, bounded in bytes.

    A message that would take the backlog past `max_bytes` drops the whole backlog and
    that message; one `resync` message takes their place (the dashboard refetches the
    run, which holds everything dropped), and until the socket has been sent it, later
    messages are dropped too (the refetch holds them as well). A message of any size
    is queued when the socket waits with nothing queued (a caught-up reader gets it
    whole). So one subscriber holds at most `max_bytes`, or one message, beyond the one
    its socket is sending. Event-loop thread only."""

    def __init__(self, run: str, max_bytes: int = QUEUE_BYTES):
        self.run = run
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self.resyncs = 0          # backlogs dropped
        self.dropped = 0          # messages dropped with them
        self._items: deque[bytes] = deque()
        self._ready = asyncio.Event()
        self._resync: bytes | None = None   # the resync message while it is queued
        self._waiting = False

    def offer(self, data: bytes) -> None:
        if self._resync is not None:
            self.dropped += 1
        elif self.queued_bytes + len(data) <= self.max_bytes or (self._waiting and not self._items):
            self._items.append(data)
            self.queued_bytes += len(data)
        else:
            self.dropped += len(self._items) + 1
            self.resyncs += 1
            if self.resyncs == 1 or self.resyncs % 100 == 0:
                log.warning("live: a reader of run %r fell behind (%d bytes queued): backlog dropped, "
                            "resync queued (%d times so far)", self.run, self.queued_bytes, self.resyncs)
            self._items.clear()
            self._resync = resync_message(self.run)
            self._items.append(self._resync)
            self.queued_bytes = len(self._resync)
        self._ready.set()

    async def get(self) -> bytes:
        """The next message to send (waits for one)."""
        while not self._items:
            self._ready.clear()
            self._waiting = True
            try:
                await self._ready.wait()
            finally:
                self._waiting = False
        data = self._items.popleft()
        self.queued_bytes -= len(data)
        if data is self._resync:
            self._resync = None
        return data


class LiveHub:
    """Run name -> subscribers, in one event loop. Each update is encoded once, at publish."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscriber]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def has_subscribers(self, run: str) -> bool:
        return bool(self._subscribers.get(run))

    def subscribe(self, run: str, max_bytes: int = QUEUE_BYTES) -> Subscriber:
        subscriber = Subscriber(run, max_bytes)
        self._subscribers.setdefault(run, set()).add(subscriber)
        return subscriber

    def unsubscribe(self, run: str, subscriber: Subscriber) -> None:
        subscribers = self._subscribers.get(run)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self._subscribers[run]

    def publish(self, run: str, message: dict[str, Any] | bytes) -> None:
        """Queue a message (a dict, or its JSON) for every subscriber of `run` (event-loop thread only)."""
        subscribers = self._subscribers.get(run)
        if not subscribers:
            return
        data = message if isinstance(message, bytes) else orjson.dumps(message)
        for subscriber in list(subscribers):
            subscriber.offer(data)

    def publish_threadsafe(self, run: str, message: dict[str, Any]) -> None:
        """From another thread: encoded there, queued in the loop."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.publish, run, orjson.dumps(message))


def points_message(run: str, steps: np.ndarray, values: dict[str, np.ndarray],
                   missing: dict[str, np.ndarray | None]) -> dict[str, Any]:
    """The live feed's one message: `{"type": "points", "run": ..., "data": <series columns>}`."""
    return {"type": "points", "run": run, "data": encode_series(steps, values, missing, LIVE_FIELDS)}


def batch_points(run: str, batch, result) -> dict[str, Any] | None:
    """`points_message` of the rows a batch stored now (none: None), read from the batch itself."""
    if batch is None or result is None or not result.accepted or result.new_mask is None:
        return None
    mask = result.new_mask
    order = np.argsort(batch.steps[mask], kind="stable")
    values: dict[str, np.ndarray] = {}
    missing: dict[str, np.ndarray | None] = {}
    for name in LIVE_FIELDS[1:]:
        column = batch.columns.get(name)
        if column is None:
            values[name] = np.full(len(order), np.nan)
            missing[name] = np.ones(len(order), dtype=bool)
        else:
            values[name] = column.values[mask][order]
            missing[name] = column.missing[mask][order] if column.missing is not None else None
    return points_message(run, batch.steps[mask][order], values, missing)


async def accept_with_token(websocket: WebSocket, kind: str, settings) -> bool:
    """Accept the socket; close it with 4401 (missing or wrong token) or 4403 (the other
    kind's token) and return False when its token may not `kind`."""
    status = token_status(presented_token(websocket.headers, websocket.query_params,
                                          allow_query=kind == "read"),  # /ws/live, not /ws/ingest
                          kind, settings.token, settings.read_token)
    await websocket.accept()
    if status != 200:
        await websocket.close(code=4401 if status == 401 else 4403,
                              reason="missing or wrong token" if status == 401 else f"not a {kind} token")
        return False
    return True


def notify_in_transaction(cursor, rows) -> None:
    """An `Ingestor.on_stored` callback (PostgreSQL): NOTIFY the other processes of the new
    rows; delivered only when the ingest transaction commits."""
    payload = json.dumps({"origin": PROCESS_TOKEN, "run": rows.run, "run_id": rows.run_id,
                          "lo": rows.first, "hi": rows.last})
    cursor.execute("SELECT pg_notify(%s, %s)", (LIVE_CHANNEL, payload))


class PostgresListener:
    """LISTEN on the live channel in a thread; hands other processes' commits to `on_notify`."""

    def __init__(self, conninfo: str, on_notify: Callable[[dict], None]):
        self.conninfo = conninfo
        self.on_notify = on_notify
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradwatch-pg-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True) as connection:
                    connection.execute(f"LISTEN {LIVE_CHANNEL}")
                    while not self._stop.is_set():
                        for notify in connection.notifies(timeout=0.5):
                            try:
                                payload = json.loads(notify.payload)
                            except ValueError:
                                continue
                            if payload.get("origin") != PROCESS_TOKEN:
                                self.on_notify(payload)
            except Exception as error:  # the database went away: retry
                log.warning("live listener: %s; reconnecting", error)
                self._stop.wait(1.0)
