"""The live feed: `/ws/live/{run}` pushes newly stored points to dashboards.

Messages: `{"type": "points", "run": ..., "data": <series columns>}`, and
`{"type": "resync", "run": ...}` when this socket fell more than
`--live-queue-bytes` behind (its backlog was dropped: refetch the run).
Tokens: accepted, then closed with 4401/4403 (a browser cannot read a refused
handshake's status)."""
from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Query, WebSocket
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from gradwatch.server.app.live import accept_with_token, points_message
from gradwatch.server.app.routes.deps import HubDep, StoreDep
from gradwatch.server.wire import MAX_STEP, BatchError, validate_run_name
from gradwatch.server.storage import UnknownRun

router = APIRouter()
LIVE_BACKLOG = 20_000  # most points replayed to a live socket that connects with ?since=


@router.websocket("/ws/live/{run}")
async def ws_live(websocket: WebSocket, run: str, store: StoreDep, hub: HubDep,
                  since: int | None = Query(None, ge=-1, le=MAX_STEP)) -> None:
    if not await accept_with_token(websocket, "read", websocket.app.state.settings):
        return
    try:
        name = validate_run_name(run)
    except BatchError as error:
        await websocket.close(code=4422, reason=str(error))
        return
    subscriber = hub.subscribe(name, websocket.app.state.settings.live_queue_bytes)

    async def pump() -> None:
        if since is not None:
            try:
                run_id = await run_in_threadpool(store.run_id, name)
                steps, values, missing = await run_in_threadpool(store.fetch_steps, run_id, since, None, None, LIVE_BACKLOG)
                if len(steps) > LIVE_BACKLOG:  # a dashboard far behind reloads /series instead
                    steps = steps[-LIVE_BACKLOG:]
                    values = {key: column[-LIVE_BACKLOG:] for key, column in values.items()}
                    missing = {key: (mask[-LIVE_BACKLOG:] if mask is not None else None)
                               for key, mask in missing.items()}
                if len(steps):
                    await websocket.send_text(orjson.dumps(points_message(name, steps, values, missing)).decode())
            except UnknownRun:
                pass
        while True:
            text = (await subscriber.get()).decode()   # the bytes go now: one copy waits to be sent
            await websocket.send_text(text)
            del text

    sender = asyncio.create_task(pump())
    try:
        while True:
            receiver = asyncio.ensure_future(websocket.receive())
            done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
            if sender in done:
                receiver.cancel()
                break
            if receiver.result()["type"] == "websocket.disconnect":
                break
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        sender.cancel()
        hub.unsubscribe(name, subscriber)
        if websocket.application_state == WebSocketState.CONNECTED and \
                websocket.client_state == WebSocketState.CONNECTED:
            try:
                await websocket.close()
            except RuntimeError:
                pass
