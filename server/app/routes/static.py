"""The dashboard's files, plotly.js, and `/healthz`."""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import mimetypes
import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gradwatch.server.app.routes.deps import StoreDep, json_response
from gradwatch.server.wire.responses import HealthOut
from gradwatch.server.storage import SCHEMA_VERSION

router = APIRouter()
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'self'")
STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")
STATIC_SUFFIXES = {".html", ".js", ".css", ".svg", ".png", ".ico", ".map", ".json", ".txt", ".woff2"}


def dashboard_dir() -> Path:
    from gradwatch.dashboard import STATIC_DIR

    return Path(STATIC_DIR)


def plotly_js_path() -> Path | None:
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "package_data" / "plotly.min.js"


@functools.lru_cache(maxsize=4)
def plotly_js_gzip(path: Path) -> bytes:
    """A plotly bundle gzipped once per process: the full 4.8 MB becomes about 1.4 MB on
    the wire, the shipped cartesian 1.5 MB about 0.5 MB; that matters for a dashboard
    opened from another machine."""
    return gzip.compress(path.read_bytes(), compresslevel=6, mtime=0)


@functools.lru_cache(maxsize=1)
def shipped_plotly_version() -> str | None:
    """The shipped bundle's version (dashboard/plotly-cartesian.json): the page asks for
    `plotly-cartesian.min.js?v=<version>`, and that URL's content never changes."""
    try:
        return str(json.loads((dashboard_dir() / "plotly-cartesian.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


# -- /docs: Swagger UI from the installed `fastapi-offline` package's files, never a CDN ----------
# (`swagger-ui-bundle` ships Swagger UI 4, which cannot read FastAPI's OpenAPI 3.1.)
DOCS_ASSETS = {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"}


def swagger_ui_dir() -> Path | None:
    """The folder of Swagger UI 5's files in the installed `fastapi-offline` (a dependency), or None."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


@router.get("/docs", include_in_schema=False)
def api_docs(request: Request) -> Response:
    """The OpenAPI page, its scripts, style and icon served from here: it works offline."""
    from fastapi.openapi.docs import get_swagger_ui_html

    if swagger_ui_dir() is None:
        return Response("Swagger UI is not installed (pip install fastapi-offline); the API "
                        "description is at /openapi.json\n", status_code=404, media_type="text/plain")
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json", title="gradwatch API",
        swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs-assets/favicon.png", oauth2_redirect_url=None)


@router.get("/docs-assets/{name}", include_in_schema=False)
def api_docs_asset(name: str) -> Response:
    folder = swagger_ui_dir()
    if folder is None or name not in DOCS_ASSETS or not (folder / name).is_file():
        return json_response({"detail": f"no docs asset {name!r}"}, status_code=404)
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if media_type.startswith("text/") or media_type.endswith("javascript"):
        media_type += "; charset=utf-8"
    return Response((folder / name).read_bytes(), media_type=media_type,
                    headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=86400"})


@router.get("/healthz", tags=["meta"], response_model=HealthOut)
def healthz(request: Request, store: StoreDep) -> Response:
    """200 while the database answers; `parse_budget` shows ingest waiting on the parse budget
    (a count), which a stalled client could otherwise hide behind a 200."""
    store.read("SELECT 1")
    return json_response({"status": "ok", "database": store.dialect, "schema_version": SCHEMA_VERSION,
                          "parse_budget": request.app.state.parse_budget.health()})


@router.get("/", include_in_schema=False)
def index() -> Response:
    path = dashboard_dir() / "index.html"
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
    if not path.is_file():
        return Response("dashboard/index.html is missing\n", status_code=404,
                        media_type="text/plain", headers=headers)
    return Response(path.read_bytes(), media_type="text/html; charset=utf-8", headers=headers)


@router.get("/static/{name}", include_in_schema=False)
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
        version = request.query_params.get("v")
        if name == "plotly-cartesian.min.js" and version is not None and version == shipped_plotly_version():
            headers["Cache-Control"] = "public, max-age=31536000, immutable"  # a versioned URL: keep it
        if (path is not None and name.endswith(".min.js") and path.is_file()
                and "gzip" in request.headers.get("accept-encoding", "")):
            headers["Vary"] = "Accept-Encoding"  # a vendored bundle (its version is recorded)
            return Response(plotly_js_gzip(path), media_type="text/javascript; charset=utf-8",
                            headers={**headers, "Content-Encoding": "gzip"})
    if path is None or not path.is_file():
        return json_response({"detail": f"no static file {name!r}"}, status_code=404)
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if media_type.startswith("text/") or media_type.endswith("javascript"):
        media_type += "; charset=utf-8"
    if path.suffix == ".html":
        headers["Content-Security-Policy"] = CSP
    return Response(path.read_bytes(), media_type=media_type, headers=headers)
