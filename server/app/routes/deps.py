"""The typed FastAPI dependencies routes take: the store, the settings, the live hub, auth.

Each is `async def`: they only read `app.state` and headers, and FastAPI runs a
plain `def` dependency in its thread pool (one hop per dependency per request,
which a 2,000-step ingest POST felt).

`create_app` puts one of each on `app.state`; these hand them to handlers, so a
route module never reaches for globals and a test can build an app around any
store and settings.
"""
from __future__ import annotations

import sqlite3
from typing import Annotated, Any

import orjson
from fastapi import Depends, HTTPException, Request
from fastapi.responses import Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import HTTPConnection

from gradwatch.server.app.live import LiveHub
from gradwatch.server.wire import validate_run_name
from gradwatch.server.app.security import presented_token, token_status
from gradwatch.server.app.settings import Settings
from gradwatch.server.storage import Store

DB_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError, sqlite3.Error)
try:
    import psycopg

    DB_ERRORS += (psycopg.Error,)
except ImportError:  # PostgreSQL support is optional
    psycopg = None


def json_response(content: Any, status_code: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json",
                    headers=headers)


async def get_settings(connection: HTTPConnection) -> Settings:
    return connection.app.state.settings


async def get_store(connection: HTTPConnection) -> Store:
    return connection.app.state.store


async def get_hub(connection: HTTPConnection) -> LiveHub:
    return connection.app.state.hub


async def run_name(run: str) -> str:
    """The `{run}` path parameter, validated (422 naming the rule when bad)."""
    return validate_run_name(run)


def check_range(start: int | None, end: int | None) -> None:
    """`start > end` is a mistake, not an empty answer: 422 naming both."""
    if start is not None and end is not None and start > end:
        raise HTTPException(422, f"start ({start}) is after end ({end})")


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
HubDep = Annotated[LiveHub, Depends(get_hub)]
RunName = Annotated[str, Depends(run_name)]


def _require(kind: str):
    async def dependency(request: Request, settings: SettingsDep) -> None:
        query_ok = kind == "read" and request.method == "GET" and request.url.path.endswith("/export.csv")
        status = token_status(presented_token(request.headers, request.query_params, allow_query=query_ok),
                              kind, settings.token, settings.read_token)
        if status == 401:
            raise HTTPException(401, f"a valid {kind} token is required (Authorization: Bearer ...)",
                                headers={"WWW-Authenticate": "Bearer"})
        if status == 403:
            raise HTTPException(403, f"this token cannot {kind}: use the {kind} token")

    return dependency


require_read = _require("read")
require_write = _require("write")
READ = [Depends(require_read)]
WRITE = [Depends(require_write)]
