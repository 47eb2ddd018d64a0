"""The FastAPI app: `create_app(settings)`.

Routes are thin: they validate the edge (run names, query parameters, tokens)
and call `storage.Store` for the database and `stats` for the numbers.
"""
from __future__ import annotations

import asyncio
import functools
import gzip
import importlib.util
import logging
import mimetypes
import re
import sqlite3
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import Depends, FastAPI, Query, Request, WebSocket
from fastapi.responses import Response, StreamingResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from gradwatch.server import stats, tensor_groups
from gradwatch.server.db import SCHEMA_VERSION, create_schema, make_engine
from gradwatch.server.live import LiveHub, PostgresListener
from gradwatch.server.schemas import (BOOL_FIELDS, COLUMNS, LIVE_FIELDS, MAX_STEP, BatchError, EventOut,
                                      HistogramOut, IngestAnswer, RecommendationOut, RunOut, StatsOut,
                                      TensorsOut, WhatIfOut, encode_bools, encode_floats, parse_batch,
                                      validate_run_name)
from gradwatch.server.security import BodySizeLimit, presented_token, require, token_status
from gradwatch.server.settings import Settings
from gradwatch.server.storage import RunArrays, Store, UnknownRun, csv_lines, encode_series

log = logging.getLogger("gradwatch.server")

CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'self'")
LIVE_BACKLOG = 20_000  # most points replayed to a live socket that connects with ?since=
EventKind = Literal["clip", "spike", "nonfinite", "conflict", "drop"]
STEP_EVENT_KINDS = ("clip", "spike", "nonfinite")  # events about one step: an agent must say which
STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")
STATIC_SUFFIXES = {".html", ".js", ".css", ".svg", ".png", ".ico", ".map", ".json", ".txt", ".woff2"}
DB_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError, sqlite3.Error)
try:
    import psycopg

    DB_ERRORS += (psycopg.Error,)
except ImportError:  # PostgreSQL support is optional
    psycopg = None


def json_response(content: Any, status_code: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json",
                    headers=headers)


def dashboard_dir() -> Path:
    from gradwatch.dashboard import STATIC_DIR

    return Path(STATIC_DIR)


def plotly_js_path() -> Path | None:
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "package_data" / "plotly.min.js"


@functools.lru_cache(maxsize=1)
def plotly_js_gzip(path: Path) -> bytes:
    """plotly.min.js gzipped once per process: 4.8 MB becomes about 1.4 MB on the wire,
    which matters for a dashboard opened from another machine."""
    return gzip.compress(path.read_bytes(), compresslevel=6, mtime=0)


def _window(arrays: RunArrays, window: int | None) -> slice:
    return slice(max(len(arrays.steps) - window, 0), None) if window else slice(None)


def _ordered(arrays: RunArrays, window: int | None) -> np.ndarray | None:
    """The cached sorted finite norms when the window is the whole run, else None."""
    return arrays.ordered_pre_norm() if not window or window >= len(arrays.steps) else None


def _ingest_message(store: Store, text: str | bytes) -> tuple[dict, str | None, Any]:
    """Handle one `/ws/ingest` message; returns (reply, run, result)."""
    seq = None
    try:
        message = orjson.loads(text)
        if not isinstance(message, dict):
            raise BatchError("a message must be a JSON object")
        seq = message.get("seq")
        unknown = sorted(set(message) - {"type", "seq", "run", "batch", "meta", "events"})
        if unknown:
            raise BatchError(f"unknown field '{unknown[0]}' in the message")
        if message.get("type") != "batch":
            raise BatchError(f"field 'type' must be 'batch', got {message.get('type')!r}")
        run = validate_run_name(message.get("run"))
        batch = parse_batch(message["batch"]) if message.get("batch") is not None else None
        meta = message.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise BatchError("field 'meta' must be an object")
        events = _validate_events(message.get("events"))
        result = store.ingest(run, batch, meta=meta, events=events)
        reply = {"type": "ack", "seq": seq, **result.answer()}
        return reply, run, (batch, result)
    except orjson.JSONDecodeError as error:
        return {"type": "error", "seq": seq, "status": 422, "detail": f"invalid JSON: {error}"}, None, None
    except BatchError as error:
        return {"type": "error", "seq": seq, "status": error.status, "detail": str(error)}, None, None
    except DB_ERRORS as error:
        log.warning("ingest failed: %s", error)
        return {"type": "error", "seq": seq, "status": 503,
                "detail": f"database unavailable: {type(error).__name__}"}, None, None


def _validate_events(events: Any) -> list[dict] | None:
    if events is None:
        return None
    if not isinstance(events, list):
        raise BatchError("field 'events' must be a list")
    out = []
    for index, item in enumerate(events):
        if not isinstance(item, dict) or not isinstance(item.get("kind"), str) \
                or not 0 < len(item["kind"]) <= 32:
            raise BatchError(f"field 'events[{index}].kind' must be a string of 1 to 32 characters")
        step = item.get("step")
        if step is None and item["kind"] in STEP_EVENT_KINDS:
            raise BatchError(f"field 'events[{index}].step' is required for a {item['kind']!r} event")
        if step is not None and (type(step) is not int or not 0 <= step <= MAX_STEP):
            raise BatchError(f"field 'events[{index}].step' must be a step number (0 to 2**53 - 1)")
        message = item.get("message", "")
        if not isinstance(message, str):
            raise BatchError(f"field 'events[{index}].message' must be a string")
        value = item.get("value")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BatchError(f"field 'events[{index}].value' must be a number")
        out.append({"kind": item["kind"], "step": step, "message": message[:10_000],
                    "detail": item.get("detail"), "value": value})
    return out


def _live_message(run: str, batch, result) -> dict | None:
    if batch is None or result is None or not result.accepted or result.new_mask is None:
        return None
    mask = result.new_mask
    order = np.argsort(batch.steps[mask], kind="stable")
    data: dict[str, list] = {"step": batch.steps[mask][order].tolist()}
    for name in LIVE_FIELDS[1:]:
        column = batch.columns.get(name)
        if column is None:
            data[name] = [None] * len(order)
        elif name in BOOL_FIELDS:
            data[name] = encode_bools(column.values[mask][order])
        else:
            missing = column.missing[mask][order] if column.missing is not None else None
            data[name] = encode_floats(column.values[mask][order], missing)
    return {"type": "points", "run": run, "data": data}


async def _accept_with_token(websocket: WebSocket, kind: str, settings: Settings) -> bool:
    """Accept the socket; close it with 4401 (missing or wrong token) or 4403 (the other
    kind's token) and return False when its token may not `kind`."""
    status = token_status(presented_token(websocket.headers, websocket.query_params), kind,
                          settings.token, settings.read_token)
    await websocket.accept()
    if status != 200:
        await websocket.close(code=4401 if status == 401 else 4403,
                              reason="missing or wrong token" if status == 401 else f"not a {kind} token")
        return False
    return True


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = make_engine(settings.db_url)
    create_schema(engine)
    store = Store(engine)
    hub = LiveHub()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        hub.loop = asyncio.get_running_loop()
        listener = None
        if store.is_postgres:
            conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
            listener = PostgresListener(conninfo, lambda payload: _on_notify(payload))
            listener.start()
        yield
        if listener is not None:
            listener.stop()
        engine.dispose()

    def _on_notify(payload: dict) -> None:
        run = payload.get("run")
        if not isinstance(run, str) or not hub.has_subscribers(run):
            return
        steps, values, missing = store.fetch_steps(int(payload["run_id"]), lo=int(payload["lo"]),
                                                   hi=int(payload["hi"]))
        if len(steps):
            hub.publish_threadsafe(run, {"type": "points", "run": run,
                                         "data": encode_series(steps, values, missing, LIVE_FIELDS)})

    app = FastAPI(title="gradwatch", version="0.1.0", lifespan=lifespan,
                  description="Gradient-norm monitoring, clipping statistics and clip-threshold "
                              "recommendations for MLX training runs. Wire format: docs/wire.md.")
    app.state.settings = settings
    app.state.store = store
    app.state.hub = hub
    app.add_middleware(BodySizeLimit, max_body=settings.max_body)
    read = [Depends(require("read"))]
    write = [Depends(require("write"))]

    @app.exception_handler(BatchError)
    async def _bad_batch(_request: Request, error: BatchError) -> Response:
        return json_response({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(UnknownRun)
    async def _unknown_run(_request: Request, error: UnknownRun) -> Response:
        return json_response({"detail": f"run {error.args[0]!r} not found"}, status_code=404)

    async def _db_error(_request: Request, error: Exception) -> Response:
        log.warning("database error: %s", error)
        return json_response({"detail": f"database unavailable: {type(error).__name__}"}, status_code=503)

    for error_type in DB_ERRORS:
        app.add_exception_handler(error_type, _db_error)

    def arrays_of(run: str, fields: tuple[str, ...] = COLUMNS[1:]) -> RunArrays:
        return store.cache.get(store.run_id(validate_run_name(run)), fields)

    # ----- health and dashboard -----

    @app.get("/healthz", tags=["meta"])
    def healthz() -> Response:
        store.read("SELECT 1")
        return json_response({"status": "ok", "database": store.dialect, "schema_version": SCHEMA_VERSION})

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        path = dashboard_dir() / "index.html"
        headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                   "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
        if not path.is_file():
            return Response("dashboard/index.html is missing\n", status_code=404,
                            media_type="text/plain", headers=headers)
        return Response(path.read_bytes(), media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str, request: Request) -> Response:
        headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
        if name == "plotly.min.js":
            path = plotly_js_path()
            headers["Cache-Control"] = "public, max-age=86400"
            headers["Vary"] = "Accept-Encoding"
            if path is not None and "gzip" in request.headers.get("accept-encoding", ""):
                return Response(plotly_js_gzip(path), media_type="text/javascript; charset=utf-8",
                                headers={**headers, "Content-Encoding": "gzip"})
        else:
            path = None
            if STATIC_NAME.match(name) and ".." not in name and Path(name).suffix in STATIC_SUFFIXES:
                path = dashboard_dir() / name
        if path is None or not path.is_file():
            return json_response({"detail": f"no static file {name!r}"}, status_code=404)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if media_type.startswith("text/") or media_type.endswith("javascript"):
            media_type += "; charset=utf-8"
        if path.suffix == ".html":
            headers["Content-Security-Policy"] = CSP
        return Response(path.read_bytes(), media_type=media_type, headers=headers)

    # ----- ingest -----

    @app.post("/api/runs/{run}/steps", tags=["ingest"], dependencies=write, response_model=IngestAnswer)
    async def ingest_steps(run: str, request: Request) -> Response:
        """Store a columnar batch (docs/wire.md). Idempotent on (run, step)."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return json_response({"detail": f"the body must be application/json, got {media_type or 'none'}"},
                                 status_code=415)
        name = validate_run_name(run)
        body = await request.body()

        def work():
            try:
                obj = orjson.loads(body)
            except orjson.JSONDecodeError as error:
                raise BatchError(f"invalid JSON: {error}") from None
            batch = parse_batch(obj)
            return batch, store.ingest(name, batch)

        batch, result = await run_in_threadpool(work)
        if hub.has_subscribers(name):
            message = _live_message(name, batch, result)
            if message:
                hub.publish(name, message)
        return json_response(result.answer())

    @app.websocket("/ws/ingest")
    async def ws_ingest(websocket: WebSocket) -> None:
        if not await _accept_with_token(websocket, "write", settings):
            return
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text is None:
                    text = message.get("bytes") or b""
                reply, run, outcome = await run_in_threadpool(_ingest_message, store, text)
                if run is not None and hub.has_subscribers(run):
                    live = _live_message(run, *outcome)
                    if live:
                        hub.publish(run, live)
                await websocket.send_text(orjson.dumps(reply).decode())
        except WebSocketDisconnect:
            return

    # ----- live -----

    @app.websocket("/ws/live/{run}")
    async def ws_live(websocket: WebSocket, run: str,
                      since: int | None = Query(None, ge=-1, le=MAX_STEP)) -> None:
        if not await _accept_with_token(websocket, "read", settings):
            return
        try:
            name = validate_run_name(run)
        except BatchError as error:
            await websocket.close(code=4422, reason=str(error))
            return
        queue = hub.subscribe(name)

        async def pump() -> None:
            if since is not None:
                try:
                    run_id = await run_in_threadpool(store.run_id, name)
                    steps, values, missing = await run_in_threadpool(store.fetch_steps, run_id, since)
                    if len(steps) > LIVE_BACKLOG:  # a dashboard far behind reloads /series instead
                        steps = steps[-LIVE_BACKLOG:]
                        values = {name: column[-LIVE_BACKLOG:] for name, column in values.items()}
                        missing = {name: (mask[-LIVE_BACKLOG:] if mask is not None else None)
                                   for name, mask in missing.items()}
                    if len(steps):
                        await websocket.send_text(orjson.dumps({
                            "type": "points", "run": name,
                            "data": encode_series(steps, values, missing, LIVE_FIELDS)}).decode())
                except UnknownRun:
                    pass
            while True:
                item = await queue.get()
                await websocket.send_text(orjson.dumps(item).decode())

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
            hub.unsubscribe(name, queue)
            if websocket.application_state == WebSocketState.CONNECTED and \
                    websocket.client_state == WebSocketState.CONNECTED:
                try:
                    await websocket.close()
                except RuntimeError:
                    pass

    # ----- reads -----

    @app.get("/api/runs", tags=["runs"], dependencies=read, response_model=list[RunOut])
    def list_runs() -> Response:
        return json_response(store.list_runs())

    @app.get("/api/runs/{run}/series", tags=["runs"], dependencies=read)
    def series(run: str, fields: str | None = Query(
                   None, description="comma-separated columns, or 'all'; default: step, pre_norm, post_norm, "
                                     "threshold, clipped, loss, spike, nonfinite (the live feed's columns)"),
               start: int | None = Query(None, ge=0, le=MAX_STEP), end: int | None = Query(None, ge=0, le=MAX_STEP),
               points: int = Query(2000, ge=2, le=10_000_000)) -> Response:
        """Columnar series; downsampled to about `points` rows by per-bucket min/max of the
        pre-clip norm, always keeping spikes and non-finite steps; never sampled."""
        if not fields:
            wanted = LIVE_FIELDS[1:]
        elif fields.strip() == "all":
            wanted = COLUMNS[1:]
        else:
            wanted = tuple(dict.fromkeys(f.strip() for f in fields.split(",") if f.strip()))
        for name in wanted:
            if name not in COLUMNS:
                raise BatchError(f"unknown field '{name}' in fields; choose from {', '.join(COLUMNS)}")
        arrays = arrays_of(run, tuple(wanted) + ("pre_norm", "spike", "nonfinite"))
        low = 0 if start is None else int(np.searchsorted(arrays.steps, start, side="left"))
        high = len(arrays.steps) if end is None else int(np.searchsorted(arrays.steps, end, side="right"))
        pre = arrays.values["pre_norm"][low:high]
        keep = (arrays.values["spike"][low:high] == 1.0) | (arrays.values["nonfinite"][low:high] == 1.0)
        chosen = stats.downsample_indices(pre, points, keep) + low
        in_range = high - low
        sub_values = {name: arrays.values[name][chosen] for name in wanted if name != "step"}
        sub_missing = {name: (arrays.missing[name][chosen] if arrays.missing[name] is not None else None)
                       for name in wanted if name != "step"}
        body = encode_series(arrays.steps[chosen], sub_values, sub_missing, tuple(wanted))
        return json_response(body, headers={"X-Total-Steps": str(in_range),
                                            "X-Downsampled": "true" if len(chosen) < in_range else "false"})

    @app.get("/api/runs/{run}/events", tags=["runs"], dependencies=read, response_model=list[EventOut])
    def events(run: str, kind: EventKind | None = Query(None, description="one kind of event; all when left out"),
               limit: int = Query(1000, ge=1, le=100_000)) -> Response:
        return json_response(store.events(store.run_id(validate_run_name(run)), kind, limit))

    @app.get("/api/runs/{run}/stats", tags=["statistics"], dependencies=read, response_model=StatsOut)
    def run_stats(run: str, window: int | None = Query(None, ge=1)) -> Response:
        arrays = arrays_of(run, ("pre_norm", "clipped", "nonfinite"))
        part = _window(arrays, window)
        result = stats.window_stats(arrays.values["pre_norm"][part], arrays.values["clipped"][part],
                                    arrays.values["nonfinite"][part], ordered=_ordered(arrays, window))
        steps = arrays.steps[part]
        result["first_step"] = int(steps[0]) if len(steps) else None
        result["last_step"] = int(steps[-1]) if len(steps) else None
        return json_response(result)

    @app.get("/api/runs/{run}/recommendation", tags=["statistics"], dependencies=read,
             response_model=RecommendationOut)
    def recommendation(run: str, window: int | None = Query(None, ge=1),
                       target_clip_rate: float = Query(0.01, ge=0.0, lt=1.0)) -> Response:
        arrays = arrays_of(run, ("pre_norm", "threshold"))
        part = _window(arrays, window)
        return json_response(stats.recommend(arrays.values["pre_norm"][part], arrays.values["threshold"][part],
                                             target_clip_rate=target_clip_rate, window=window,
                                             ordered=_ordered(arrays, window)))

    @app.get("/api/runs/{run}/whatif", tags=["statistics"], dependencies=read, response_model=WhatIfOut)
    def whatif(run: str, threshold: float = Query(..., allow_inf_nan=False),
               window: int | None = Query(None, ge=1)) -> Response:
        arrays = arrays_of(run, ("pre_norm",))
        return json_response(stats.whatif(arrays.values["pre_norm"][_window(arrays, window)], threshold,
                                          ordered=_ordered(arrays, window)))

    @app.get("/api/runs/{run}/histogram", tags=["statistics"], dependencies=read, response_model=HistogramOut)
    def histogram(run: str, window: int | None = Query(None, ge=1), bins: int = Query(60, ge=1, le=1000)) -> Response:
        arrays = arrays_of(run, ("pre_norm",))
        return json_response(stats.histogram(arrays.values["pre_norm"][_window(arrays, window)], bins,
                                             ordered=_ordered(arrays, window)))

    @app.get("/api/runs/{run}/tensors", tags=["runs"], dependencies=read, response_model=TensorsOut)
    def tensors(run: str, start: int | None = Query(None, ge=0, le=MAX_STEP),
                end: int | None = Query(None, ge=0, le=MAX_STEP),
                points: int = Query(500, ge=1, le=100_000),
                group: Literal["block", "module", "tensor"] = Query(
                    "tensor", description="rows: one per tensor, or per module path (block `layers.N`, "
                    "module `layers.N.mlp`), each the per-step L2 of its tensors' norms")) -> Response:
        """Per-tensor norms, one row per tensor; downsampled by the max per bucket of steps."""
        if group != "tensor":  # per-step norms first: a group's norm is not a max of bucket maxima
            names, steps, norms, absent = tensor_groups.read_step_norms(store, store.run_id(validate_run_name(run)), start, end)
            return json_response(tensor_groups.grouped_answer(names, steps, norms, absent, group, points))
        names, steps, norms, absent = store.tensor_norms(store.run_id(validate_run_name(run)), start, end, points)
        rows = [encode_floats(np.asarray(norms[:, i], dtype=np.float64), absent[:, i]) for i in range(len(names))]
        return json_response({"names": names, "step": steps.tolist(), "norms": rows})

    @app.get("/api/runs/{run}/export.csv", tags=["runs"], dependencies=read)
    def export_csv(run: str) -> StreamingResponse:
        arrays = arrays_of(run)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run)[:100]
        return StreamingResponse(csv_lines(arrays), media_type="text/csv; charset=utf-8",
                                 headers={"Content-Disposition": f'attachment; filename="{safe}.csv"'})

    return app


def app_from_env() -> FastAPI:
    """Factory for uvicorn worker processes (`gradwatch serve --workers N`)."""
    return create_app(Settings.from_env())
