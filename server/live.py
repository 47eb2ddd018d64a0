"""Live feed: push newly stored points to `/ws/live/{run}` subscribers.

In one process, ingest publishes to the subscribers right after its commit.
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
import threading
from typing import Any, Callable

import numpy as np
from fastapi import WebSocket

from gradwatch.server.schemas import LIVE_FIELDS
from gradwatch.server.security import presented_token, token_status
from gradwatch.server.storage import encode_series

import os

LIVE_CHANNEL = "gradwatch_live"
PROCESS_TOKEN = f"{os.getpid()}-{os.urandom(4).hex()}"

log = logging.getLogger("gradwatch.server")
QUEUE_SIZE = 256


class LiveHub:
    """Run name -> subscriber queues, in one event loop."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def has_subscribers(self, run: str) -> bool:
        return bool(self._subscribers.get(run))

    def subscribe(self, run: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._subscribers.setdefault(run, set()).add(queue)
        return queue

    def unsubscribe(self, run: str, queue: asyncio.Queue) -> None:
        queues = self._subscribers.get(run)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._subscribers[run]

    def publish(self, run: str, message: dict[str, Any]) -> None:
        """Queue a message for every subscriber of `run` (event-loop thread only)."""
        for queue in list(self._subscribers.get(run, ())):
            if queue.full():  # a dashboard that stopped reading: drop its oldest message
                queue.get_nowait()
            queue.put_nowait(message)

    def publish_threadsafe(self, run: str, message: dict[str, Any]) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.publish, run, message)


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
