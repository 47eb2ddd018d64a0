"""Tokens and request-size limits.

Two tokens, two kinds: the write token (`--token`) guards ingest, the read
token (`--read-token`) guards reads. Each is checked with
`hmac.compare_digest`; a missing or unknown token is 401, a token of the other
kind is 403. A guard whose token is not set lets everyone through.
"""
from __future__ import annotations

import hmac
from typing import Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

Kind = Literal["read", "write"]


def presented_token(headers, query_params, allow_query: bool = False) -> str | None:
    """`Authorization: Bearer T`; `?token=T` only where a browser cannot send a header
    (`allow_query`: the CSV download link and the `/ws/live` WebSocket), never for writes:
    a token in a URL ends up in logs and histories, and a write token must not."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return (query_params.get("token") or None) if allow_query else None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def token_status(presented: str | None, kind: Kind, write_token: str | None,
                 read_token: str | None) -> int:
    """200 when allowed, 401 when missing or wrong, 403 when it is the other kind's token."""
    wanted, other = (write_token, read_token) if kind == "write" else (read_token, write_token)
    if wanted is None:
        return 200
    if presented is None:
        return 401
    if _same(presented, wanted):
        return 200
    if other is not None and _same(presented, other):
        return 403
    return 401


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over `max_body`, checked before and while reading.

    A declared Content-Length over the limit is refused without reading the
    body; otherwise the bytes are counted as they stream in and the request is
    stopped at the first chunk past the limit.
    """

    def __init__(self, app: ASGIApp, max_body: int):
        self.app = app
        self.max_body = max_body

    async def _refuse(self, send: Send, status: int, detail: str) -> None:
        body = ('{"detail":"%s"}' % detail).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._refuse(send, 400, "Content-Length is not a number")
                    return
                if declared > self.max_body:
                    await self._refuse(send, 413, f"body of {declared} bytes is over the limit of "
                                                  f"{self.max_body} bytes")
                    return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, 413, f"body is over the limit of {self.max_body} bytes")


# ----- the edge: trusted Host names (DNS rebinding) and WebSocket origins (CSWSH) -----

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(address: str) -> bool:
    """Whether the address the server binds is reachable only from this machine."""
    import ipaddress

    name = address.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """`Host` header (or allow-list entry) -> bare lower-case name: `[::1]:8765` -> `::1`."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def allowed_hosts(bind: str, allow_host: list[str]) -> frozenset[str] | None:
    """The Host names a server bound to `bind` answers; None when it answers any.

    A loopback-bound server answers the loopback names and `--allow-host`: a web
    page whose DNS name was rebound to 127.0.0.1 sends its own name and is refused.
    A server bound elsewhere answers any Host (the team setup behind a proxy)
    unless `--allow-host` names some; `*` among them answers any.
    """
    names = {host_name(item) for item in allow_host}
    if "*" in names:
        return None
    if not names and not is_loopback(bind):
        return None
    return frozenset(names | LOOPBACK_NAMES)


def origin_allowed(origin: str | None, host: str | None, allow_origin: list[str]) -> bool:
    """No Origin: not a browser (the agent), allowed. Else the origin must be the
    server's own (its host:port is the request's Host) or on `--allow-origin`."""
    if origin is None:
        return True
    origin = origin.strip().lower().rstrip("/")
    if origin in {item.strip().lower().rstrip("/") for item in allow_origin} or "*" in allow_origin:
        return True
    scheme, sep, netloc = origin.partition("://")
    if not sep or scheme not in ("http", "https") or host is None:
        return False
    default = ":80" if scheme == "http" else ":443"
    host = host.strip().lower()
    return netloc == host or netloc + default == host or netloc == host + default


class EdgeGuard:
    """ASGI middleware: refuse a `Host` the server does not answer (421) and a browser
    WebSocket from a foreign origin (403), each with a message naming the flag."""

    def __init__(self, app: ASGIApp, bind: str, allow_host: list[str], allow_origin: list[str]):
        self.app = app
        self.bind = bind
        self.hosts = allowed_hosts(bind, allow_host)
        self.allow_origin = list(allow_origin)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, text: str) -> None:
        body = text.encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"),
                   (b"content-length", str(len(body)).encode())]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await receive()  # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:  # the server answers 403 without a body
            await send({"type": "websocket.close", "code": 1008, "reason": text[:120]})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = origin = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
        if self.hosts is not None and host is not None and host_name(host) not in self.hosts:
            shown = host_name(host)[:100]
            await self._refuse(scope, receive, send, 421,
                               f"this server (bound to {self.bind}) does not answer the Host name "
                               f"{shown!r}; to allow it: gradwatch serve --allow-host {shown} "
                               f"(or GRADWATCH_ALLOW_HOST)")
            return
        if scope["type"] == "websocket" and not origin_allowed(origin, host, self.allow_origin):
            await self._refuse(scope, receive, send, 403,
                               f"WebSocket from origin {origin[:100]!r} refused: only the server's own "
                               f"origin or one given with gradwatch serve --allow-origin ORIGIN "
                               f"(or GRADWATCH_ALLOW_ORIGIN)")
            return
        await self.app(scope, receive, send)


# ----- parsing memory: concurrent large bodies wait their turn -----

class ByteBudget:
    """At most `capacity` bytes of request bodies being read, parsed and stored at once.

    Reading and parsing a body costs a few times its size (the chunks as received
    and joined, then `parse.py`'s columns: at most about 4x, whatever the body
    holds); ten clients each sending a 32 MiB body would multiply that by ten. Each ingest holds its body's size (its Content-Length, or `max_body`
    when it streams without one) from before the body is read until it is stored;
    the others wait. `create_app` sizes it at 2x `max_body`: two full bodies at a
    time. The counters (`holders`, `waiting`, `peak_*`) are read by tests and
    `on_change` callbacks run (in the event loop) whenever they move.
    """

    def __init__(self, capacity: int):
        import asyncio

        self.capacity = capacity
        self.in_use = self.holders = self.waiting = 0
        self.peak_bytes = self.peak_holders = 0
        self.on_change: list = []
        self._condition = asyncio.Condition()

    def _changed(self) -> None:
        for callback in list(self.on_change):
            callback(self)

    def hold(self, size: int):
        from contextlib import asynccontextmanager

        size = max(0, min(int(size), self.capacity))

        @asynccontextmanager
        async def holding():
            async with self._condition:
                self.waiting += 1
                self._changed()
                try:
                    await self._condition.wait_for(lambda: self.in_use + size <= self.capacity)
                finally:
                    self.waiting -= 1
                self.in_use += size
                self.holders += 1
                self.peak_bytes = max(self.peak_bytes, self.in_use)
                self.peak_holders = max(self.peak_holders, self.holders)
                self._changed()
            try:
                yield
            finally:
                async with self._condition:
                    self.in_use -= size
                    self.holders -= 1
                    self._condition.notify_all()
                    self._changed()

        return holding()
