"""`gradwatch serve`: open the database, bind the port, run the app under uvicorn."""
from __future__ import annotations

import argparse
import socket
import sys

from gradwatch.server.app.settings import Settings


KEEP_ALIVE_S = 10  # idle keep-alive connections: enough for an agent's next POST, short for a slow client


def _fail(message: str) -> int:
    print(f"gradwatch serve: {message}", file=sys.stderr)
    return 2


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip().splitlines()
    return text[0] if text else type(error).__name__


def check_database(url: str) -> str | None:
    """Open the database and create the schema; None when fine, else one line saying why not."""
    from gradwatch.server.storage import create_schema, make_engine

    try:
        engine = make_engine(url)
    except Exception as error:
        return f"cannot use database URL {_safe_url(url)!r}: {_first_line(error)}"
    try:
        create_schema(engine)
    except Exception as error:
        return f"cannot open database {_safe_url(url)}: {_first_line(error)}"
    finally:
        engine.dispose()
    return None


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def uvicorn_options(settings: Settings) -> dict:
    """The uvicorn.Config options every server process uses (one process or each worker).

    uvicorn cannot time out a slow header read (README: "Running the server for a team" gives
    the proxy settings); a stalled body is answered 408 by `security.BodySizeLimit`, an idle
    keep-alive connection is closed after 10 s, and a WebSocket message stalled mid-frame is
    closed when its ping goes unanswered (the client cannot answer one inside a frame). Past
    `max_connections` open connections uvicorn answers new requests 503 instead of letting
    them hang once the process runs out of file descriptors."""
    return dict(ws_max_size=settings.max_body, access_log=False, log_level="warning",
                timeout_keep_alive=KEEP_ALIVE_S, ws_ping_interval=settings.ws_ping_interval,
                ws_ping_timeout=settings.ws_ping_timeout,
                limit_concurrency=min(settings.max_connections, connection_room()))


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children inherit it); the
    soft limit now in force. At the common default of 1,024, normal clients failed at about
    1,100 stalled connections."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft >= hard:
        return soft
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    except (ValueError, OSError):
        return soft


def connection_room() -> int:
    """The connections this process can hold open: its file limit less some for the database,
    log files and the library's own descriptors."""
    try:
        import resource
    except ImportError:
        return 1 << 16
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(64, (1 << 20 if soft == resource.RLIM_INFINITY else soft) - 128)


def announce(settings: Settings) -> None:
    """The one line saying where the server listens, once the port is bound."""
    print(f"gradwatch serving http://{settings.host}:{settings.port}/ "
          f"(database {_safe_url(settings.db_url)}, workers {settings.workers})", file=sys.stderr, flush=True)


def serve(settings: Settings) -> int:
    import uvicorn

    raise_open_file_limit()  # before any worker starts: they inherit it
    problem = check_database(settings.db_url)  # creates or upgrades the schema, once, first
    if problem:
        return _fail(problem)
    if settings.workers > 1:
        from gradwatch.server.commands.workers import serve_workers

        return serve_workers(settings)
    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as error:
        return _fail(f"cannot listen on {settings.host}:{settings.port}: {error.strerror or error}")
    announce(settings)
    from gradwatch.server.app.factory import create_app
    from gradwatch.server.app.malloc import limit_retained_memory

    limit_retained_memory()   # before any thread starts: the arenas are per thread

    server = uvicorn.Server(uvicorn.Config(create_app(settings), **uvicorn_options(settings)))
    server.run(sockets=[sock])
    return 0


def serve_from_args(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from gradwatch.server.commands.cli import settings_from_args
    from gradwatch.server.app.settings import SERVE_FLAGS

    try:
        settings = settings_from_args(args)
    except ValidationError as error:
        problem = error.errors()[0]
        field = str(problem["loc"][0]) if problem["loc"] else "db_url"
        field = "db_url" if field == "GRADWATCH_DB" else field
        return _fail(f"{SERVE_FLAGS.get(field, field)} (or {Settings.env_name(field)}): "
                     f"{problem['msg'].lower()}, got {problem.get('input')!r}")
    return serve(settings)
