"""The FastAPI app: `create_app(settings)` wires the pieces and nothing else.

Upgrades the database (`storage.migrate`), builds the store and the live hub,
puts them and the settings on `app.state` (routes take them as typed
dependencies, `routes.deps`), adds the body-size limit and the error handlers,
and includes the routers (`routes.ROUTERS`).
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response

from gradwatch.server.alerts.dispatch import Alert, AlertDispatcher, AlertRules, DatabaseClaims, _json_number
from gradwatch.server.app.live import LiveHub, PostgresListener, notify_in_transaction, points_message
from gradwatch.server.app.routes import ROUTERS
from gradwatch.server.app.routes.deps import DB_ERRORS, json_response
from gradwatch.server.wire import BatchError
from gradwatch.server.app.security import BodySizeLimit, ByteBudget, EdgeGuard, refuse_handshake
from gradwatch.server.app.warmup import warm_request, warm_up
from gradwatch.server.app.settings import Settings
from gradwatch.server.storage import Store, UnknownRun, create_schema, make_engine

log = logging.getLogger("gradwatch.server")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = make_engine(settings.db_url)
    create_schema(engine)
    store = Store(engine, cache_mb=settings.cache_mb)
    hub = LiveHub()
    if store.is_postgres:
        store.ingestor.on_stored.append(notify_in_transaction)

    def on_notify(payload: dict) -> None:
        """Another process stored rows (PostgreSQL NOTIFY): push them to our dashboards."""
        run = payload.get("run")
        if not isinstance(run, str) or not hub.has_subscribers(run):
            return
        steps, values, missing = store.fetch_steps(int(payload["run_id"]), lo=int(payload["lo"]),
                                                   hi=int(payload["hi"]))
        if len(steps):
            hub.publish_threadsafe(run, points_message(run, steps, values, missing))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        hub.loop = asyncio.get_running_loop()
        try:   # before the first request (server/app/warmup.py); a failure here only costs speed
            warm_up(store)
            await warm_request(app)
        except Exception:
            log.warning("warm-up failed", exc_info=True)
        alerts = start_alerts(settings, store)
        app.state.alerts = alerts
        listener = None
        if store.is_postgres:
            conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
            listener = PostgresListener(conninfo, on_notify)
            listener.start()
        yield
        if listener is not None:
            listener.stop()
        if alerts is not None:
            store.ingestor.after_commit.remove(alerts.hook)
            alerts.close()
        engine.dispose()

    app = FastAPI(title="gradwatch", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # /docs is served offline (routes/static.py)
                  description="Gradient-norm monitoring, clipping statistics and clip-threshold "
                              "recommendations for MLX training runs. Wire format: docs/wire.md.")
    app.state.settings = settings
    app.state.store = store
    app.state.hub = hub
    app.state.parse_budget = ByteBudget(2 * settings.max_body)  # two full bodies parsed at a time
    app.add_middleware(BodySizeLimit, max_body=settings.max_body, idle=settings.body_idle_timeout,
                       deadline=settings.body_deadline)
    app.router.default = not_found  # a WebSocket to an unknown path: HTTP 404, not 403
    app.add_middleware(EdgeGuard, bind=settings.host, allow_host=settings.allow_host,  # outermost
                       allow_origin=settings.allow_origin)
    add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


ALERT_COLUMNS = ("pre_norm", "nonfinite", "spike", "level_shift", "clipped")


def start_alerts(settings: Settings, store: Store) -> AlertDispatcher | None:
    """The webhook dispatcher, fed after each commit with the new steps of a batch (never
    inside the transaction, never blocking: `submit` only queues). Off without a webhook."""
    if not settings.alert_webhook:
        return None

    def record(alert: Alert) -> None:
        """Each alert sent is stored as an `alert` event of its run (through the store)."""
        store.ingest(alert.run, None, events=[{
            "step": alert.step, "kind": "alert", "value": alert.value, "threshold": alert.threshold,
            "message": alert.message,
            "detail": {"kind": alert.kind, "value": _json_number(alert.value), "suppressed": alert.suppressed}}])

    dispatcher = AlertDispatcher(settings.alert_webhook, AlertRules(
        clip_rate=settings.alert_clip_rate, window=settings.alert_window,
        min_interval=settings.alert_min_interval), record=record, claim=DatabaseClaims(store.engine))

    def hook(run: str, batch, result) -> None:
        mask = result.new_mask
        columns = {"step": batch.steps if mask is None else batch.steps[mask]}
        for name in ALERT_COLUMNS:
            column = batch.columns.get(name)
            if column is None:
                continue
            values = column.values if mask is None else column.values[mask]
            columns[name] = values if name == "pre_norm" else values == 1.0
        dispatcher.submit(run, columns)

    dispatcher.hook = hook
    store.ingestor.after_commit.append(hook)
    return dispatcher


async def not_found(scope, receive, send) -> None:
    """The router's answer when no route matches: Starlette closes a WebSocket before
    accept(), which uvicorn answers 403, the status of a refused token; here it is a 404
    through the `websocket.http.response` extension, so a client can tell the two apart."""
    if scope["type"] == "websocket":
        from starlette.websockets import WebSocket

        await refuse_handshake(WebSocket(scope, receive, send), 404,
                               f"no gradwatch WebSocket at {scope.get('path', '')[:200]} "
                               f"(the agent's is /ws/ingest, the dashboard's /ws/live/RUN)")
        return
    raise HTTPException(status_code=404)


def add_error_handlers(app: FastAPI) -> None:
    """Bad input 422 (or the status a BatchError names), unknown run 404, database down 503."""

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


def app_from_env() -> FastAPI:
    """Factory for uvicorn worker processes (`gradwatch serve --workers N`)."""
    return create_app(Settings.from_env())
