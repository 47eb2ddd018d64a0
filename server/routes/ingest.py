"""Ingest: `POST /api/runs/{run}/steps` and the agent's WebSocket `/ws/ingest`.

Validation lives in `schemas` (batches, events, messages); the store stores;
these handlers move bytes, run the work off the event loop, and tell the live
feed what was stored.
"""
from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from gradwatch.server.live import LiveHub, accept_with_token, batch_points
from gradwatch.server.routes.deps import DB_ERRORS, WRITE, HubDep, RunName, StoreDep, json_response
from gradwatch.server import wire
from gradwatch.server.schemas import BatchError, IngestAnswer
from gradwatch.server.storage import MetaTooLarge, Store

log = logging.getLogger("gradwatch.server")
router = APIRouter(tags=["ingest"])


def _publish(hub: LiveHub, run: str, batch, result) -> None:
    if hub.has_subscribers(run):
        message = batch_points(run, batch, result)
        if message:
            hub.publish(run, message)


@router.post("/api/runs/{run}/steps", dependencies=WRITE, response_model=IngestAnswer)
async def ingest_steps(name: RunName, request: Request, store: StoreDep, hub: HubDep) -> Response:
    """Store a columnar batch (docs/wire.md). Idempotent on (run, step)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in wire.MEDIA_TYPES:
        return json_response({"detail": f"the body must be {' or '.join(wire.MEDIA_TYPES)}, "
                                        f"got {media_type or 'none'}"}, status_code=415)
    too_big = _json_too_big(media_type, request.headers.get("content-length", ""))
    if too_big:
        return json_response({"detail": too_big}, status_code=413)
    budget = request.app.state.parse_budget
    declared = request.headers.get("content-length")
    declared = int(declared) if declared and declared.isdigit() else None
    size = declared if declared is not None else request.app.state.settings.max_body
    async with budget.hold(size):  # concurrent large bodies wait their turn (security.ByteBudget)
        body = await read_body(request, declared)

        def work():
            batch = wire.load_batch(body, media_type)  # server/wire: JSON by orjson, msgpack in bounded memory
            return batch, store.ingest(name, batch)

        batch, result = await run_in_threadpool(work)
    _publish(hub, name, batch, result)
    return json_response(result.answer())


def _json_too_big(media_type: str, size: str) -> str | None:
    """The refusal of a JSON body over `wire.json_decode.MAX_JSON_BODY` (None when it fits)."""
    limit = wire.json_decode.MAX_JSON_BODY
    if media_type != wire.JSON_MEDIA_TYPE or not size.isdigit() or int(size) <= limit:
        return None
    return (f"a JSON body may be at most {limit} bytes, got {size}; "
            f"send {wire.MSGPACK_MEDIA_TYPE} for larger batches (docs/wire.md)")


async def read_body(request: Request, declared: int | None) -> bytearray:
    """The body in one buffer, written as its chunks arrive: about 1x its size, where
    `request.body()` holds the chunks and their join at once (2x)."""
    if declared is None:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
        return body
    body = bytearray(declared)
    filled = 0
    async for chunk in request.stream():
        body[filled:filled + len(chunk)] = chunk  # grows the buffer if more than declared arrives
        filled += len(chunk)
    del body[filled:]
    return body


def handle_message(store: Store, text: str | bytes) -> tuple[dict, str | None, Any]:
    """One `/ws/ingest` message: (reply, run, (batch, result)); errors become replies."""
    seq = None
    try:
        if isinstance(text, str):
            too_big = _json_too_big(wire.JSON_MEDIA_TYPE, str(len(text)))
            if too_big:
                raise BatchError(too_big.replace("body", "text message").replace(
                    wire.MSGPACK_MEDIA_TYPE, "binary (msgpack) messages"), status=413)
        seq, message = wire.load_message(text)  # text frames JSON, binary frames msgpack (server/wire)
        result = store.ingest(message.run, message.batch, meta=message.meta, events=message.events)
        return {"type": "ack", "seq": seq, **result.answer()}, message.run, (message.batch, result)
    except (BatchError, MetaTooLarge) as error:  # MetaTooLarge: 413, the run's meta cap
        seq = getattr(error, "seq", seq)
        return {"type": "error", "seq": seq, "status": error.status, "detail": str(error)}, None, None
    except DB_ERRORS as error:
        log.warning("ingest failed: %s", error)
        return {"type": "error", "seq": seq, "status": 503,
                "detail": f"database unavailable: {type(error).__name__}"}, None, None
    except Exception as error:  # a bug must not cost the agent its socket: answer and go on
        log.exception("ingest message failed")
        return {"type": "error", "seq": seq, "status": 500,
                "detail": f"internal error: {type(error).__name__}"}, None, None


@router.websocket("/ws/ingest")
async def ws_ingest(websocket: WebSocket, store: StoreDep, hub: HubDep) -> None:
    if not await accept_with_token(websocket, "write", websocket.app.state.settings):
        return
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                text = message.get("bytes") or b""
            async with websocket.app.state.parse_budget.hold(len(text)):
                reply, run, outcome = await run_in_threadpool(handle_message, store, text)
            del text, message
            if run is not None:
                _publish(hub, run, *outcome)
            await websocket.send_text(orjson.dumps(reply).decode())
    except WebSocketDisconnect:
        return
