"""Ingest: `POST /api/runs/{run}/steps` and the agent's WebSocket `/ws/ingest`.

Decoding and validation live in the wire room (`server/wire`: batches, events,
messages, in JSON or msgpack); the store stores; these handlers move bytes, run
the work off the event loop, and tell the live feed what was stored.
"""
from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from gradwatch.server.app.live import LiveHub, batch_points
from gradwatch.server.app.routes.deps import DB_ERRORS, WRITE, HubDep, RunName, StoreDep, json_response
from gradwatch.server import wire
from gradwatch.server.wire import BatchError
from gradwatch.server.wire.responses import IngestAnswer
from gradwatch.server.storage import MetaTooLarge, Store
from gradwatch.server.app.security import BudgetHold, presented_token, refuse_handshake, token_status

log = logging.getLogger("gradwatch.server")
router = APIRouter(tags=["ingest"])


def _publish(hub: LiveHub, run: str, batch, result) -> None:
    if hub.has_subscribers(run):
        message = batch_points(run, batch, result)
        if message:
            hub.publish(run, message)


@router.post("/api/runs/{run}/steps", dependencies=WRITE, response_model=IngestAnswer)
async def ingest_steps(name: RunName, request: Request) -> Response:
    """Store a columnar batch (docs/wire.md). Idempotent on (run, step).

    The store and the live hub are read from `app.state` here rather than as dependencies:
    this is the hot path, and FastAPI solves each dependency per request."""
    store: Store = request.app.state.store
    hub: LiveHub = request.app.state.hub
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in wire.MEDIA_TYPES:
        return json_response({"detail": f"the body must be {' or '.join(wire.MEDIA_TYPES)}, "
                                        f"got {media_type or 'none'}"}, status_code=415)
    too_big = _json_too_big(media_type, request.headers.get("content-length", ""))
    if too_big:
        return json_response({"detail": too_big}, status_code=413)
    async with request.app.state.parse_budget.hold() as hold:  # charged as bytes arrive (security.ByteBudget)
        body = await read_body(request, hold)
        if media_type == wire.JSON_MEDIA_TYPE:  # orjson builds an object per value: charged ~30x
            too_big = _json_too_big(media_type, str(len(body)))
            if too_big:
                return json_response({"detail": too_big}, status_code=413)
            await hold.grow((wire.json_decode.PARSE_FACTOR - 1) * len(body))

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


async def read_body(request: Request, hold: BudgetHold) -> bytearray:
    """The body in one buffer that grows with the bytes received (never sized from a
    declared Content-Length), each chunk charged to the parse budget before it is kept.
    Stalled bodies are answered 408 by `security.BodySizeLimit`."""
    body = bytearray()
    async for chunk in request.stream():
        if chunk:
            await hold.grow(len(chunk))
            body += chunk
    return body


def _frame_cost(frame: str | bytes) -> int:
    """What a frame is charged while parsed: a JSON text frame ~30x its size (an object per
    value), a binary one its size (typed arrays are read in place)."""
    parsed = isinstance(frame, str) and len(frame) <= wire.json_decode.MAX_JSON_BODY  # a longer one is refused
    return len(frame) * (wire.json_decode.PARSE_FACTOR if parsed else 1)


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
    settings = websocket.app.state.settings  # the token before accept(): a refused client sends no frame
    status = token_status(presented_token(websocket.headers, websocket.query_params), "write",
                          settings.token, settings.read_token)
    if status != 200:
        await refuse_handshake(websocket, status, "a valid write token is required (Authorization: Bearer ...)"
                               if status == 401 else "this token cannot write: use the write token")
        return
    await websocket.accept(headers=[(b"x-gradwatch-wire", b"json, msgpack")])  # the agent sends msgpack then
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                text = message.get("bytes") or b""
            async with websocket.app.state.parse_budget.hold(_frame_cost(text)):
                reply, run, outcome = await run_in_threadpool(handle_message, store, text)
            del text, message
            if run is not None:
                _publish(hub, run, *outcome)
            await websocket.send_text(orjson.dumps(reply).decode())
    except WebSocketDisconnect:
        return
