"""Tokens and request-size limits.

Two tokens, two kinds: the write token (`--token`) guards ingest, the read
token (`--read-token`) guards reads. Each is checked with
`hmac.compare_digest`; a missing or unknown token is 401, a token of the other
kind is 403. A guard whose token is not set lets everyone through.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
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


class BodyTimeout(Exception):
    """The client sent nothing for `idle` seconds, or not the whole body within its deadline."""


BODY_MIN_RATE = 256 * 1024   # bytes per second a body may not fall below over its whole length


def body_deadline(size: int, minimum: float) -> float:
    """Seconds a body of `size` bytes may take in all: max(minimum, size / 256 KiB/s)."""
    return max(minimum, size / BODY_MIN_RATE)


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over `max_body`; 408 for bodies that stall.

    A declared Content-Length over the limit is refused without reading the
    body; otherwise the bytes are counted as they stream in and the request is
    stopped at the first chunk past the limit. Each wait for the next chunk is
    bounded by `idle` seconds, and the waits of one body together by
    `body_deadline(size, deadline)` (size: the declared length, else `max_body`),
    so a client can neither stop sending nor trickle a byte every `idle - 1`
    seconds. Only time spent waiting on the client counts: a handler waiting on
    the parse budget (`ByteBudget`) is not reading, and is never timed out.
    A stalled body gets 408 with `Connection: close`, chunked or not.
    """

    def __init__(self, app: ASGIApp, max_body: int, idle: float = 15.0, deadline: float = 30.0):
        self.app = app
        self.max_body = max_body
        self.idle = idle
        self.deadline = deadline

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
        declared = None
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
        loop = asyncio.get_running_loop()
        allowed = body_deadline(self.max_body if declared is None else declared, self.deadline)
        received = 0
        waited = 0.0          # seconds spent waiting on the client for this body
        body_done = False     # after the last chunk, receive() waits for a disconnect: not timed
        started = False

        async def guarded_receive() -> Message:
            nonlocal received, waited, body_done
            if body_done:
                return await receive()
            timeout = min(self.idle, allowed - waited)
            began = loop.time()
            try:
                message = await asyncio.wait_for(receive(), max(timeout, 0.0))
            except asyncio.TimeoutError:
                raise BodyTimeout(f"no body bytes for {self.idle:g} s" if timeout >= self.idle else
                                  f"the body took over {allowed:g} s") from None
            finally:
                waited += loop.time() - began
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
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
            await self.app(scope, guarded_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, 413, f"body is over the limit of {self.max_body} bytes")
        except BodyTimeout as error:
            if started:
                raise
            await self._refuse(send, 408, f"request body timed out: {error}")


# ----- the edge: trusted Host names (DNS rebinding) and WebSocket origins (CSWSH) -----

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def bind_address(address: str) -> "ipaddress.IPv4Address | ipaddress.IPv6Address | None":
    """The address a bind to `address` listens on, parsed as the bind parses it; None for a name.

    Python's bind reads an IPv4 address as four decimal numbers and otherwise asks
    getaddrinfo, which takes inet_aton's forms (`127.1`, `0x7f.1`); an IPv6 one with
    inet_pton. `ipaddress` alone rejects `127.000.000.001`, and (before Python 3.13)
    calls `::ffff:127.0.0.1` not loopback, so a v4-mapped address is unwrapped."""
    name = address.strip().strip("[]")
    if ":" in name:
        try:
            parsed = ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, name.split("%", 1)[0]))
        except (OSError, ValueError):
            return None
        return parsed.ipv4_mapped or parsed
    parts = name.split(".")
    if len(parts) == 4 and all(part.isdigit() and int(part) <= 255 for part in parts):
        return ipaddress.IPv4Address(bytes(int(part) for part in parts))
    try:
        return ipaddress.IPv4Address(socket.inet_aton(name))
    except (OSError, ValueError):
        return None


def is_loopback(address: str) -> bool:
    """Whether the address the server binds is reachable only from this machine."""
    if address.strip().strip("[]").lower().rstrip(".") == "localhost":
        return True
    parsed = bind_address(address)
    return parsed is not None and parsed.is_loopback


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
        hosts = 0
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
                hosts += 1
            elif name == b"origin":
                origin = value.decode("latin-1")
        if hosts > 1 or (host is not None and "," in host):  # which one would a proxy have checked?
            await self._refuse(scope, receive, send, 400,
                               "one Host header with one name, please" if hosts == 1 else
                               f"{hosts} Host headers: a request carries exactly one")
            return
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

class BudgetHold:
    """One request's share of a `ByteBudget`: grows as its bytes arrive, released as a whole."""

    def __init__(self, budget: "ByteBudget", ticket: int):
        self.budget = budget
        self.ticket = ticket
        self.bytes = 0

    async def grow(self, size: int) -> None:
        """Charge `size` more bytes, waiting while the budget is full (see `ByteBudget`)."""
        await self.budget._grow(self, size)


class ByteBudget:
    """At most `capacity` bytes of request bodies being read, parsed and stored at once.

    Reading and parsing a body costs a few times its size; ten clients each sending a
    32 MiB body would multiply that by ten. Each ingest is charged its bytes as they
    arrive (`BudgetHold.grow`, never from a declared Content-Length: a client that
    declares 32 MiB and sends one byte holds one byte) and holds them until its batch is
    stored; a chunk that does not fit waits. So that two half-read bodies can never
    wait on each other, the oldest holder is always let through (one hold is charged at
    most `capacity`), so the total stays under 2x `capacity`: the others only grow while
    the sum fits. `create_app` sizes it at 2x `max_body`. The
    counters (`holders`, `waiting`, `peak_*`) are read by tests and `/healthz`, and
    `on_change` callbacks run (in the event loop) whenever they move.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = self.holders = self.waiting = 0
        self.peak_bytes = self.peak_holders = 0
        self.on_change: list = []
        self._condition = asyncio.Condition()
        self._holding: dict[int, BudgetHold] = {}  # by first charge: the first one is the oldest
        self._tickets = 0

    def _changed(self) -> None:
        for callback in list(self.on_change):
            callback(self)

    def _fits(self, hold: BudgetHold, size: int) -> bool:
        if self.in_use + size <= self.capacity:
            return True
        return hold.bytes > 0 and next(iter(self._holding)) == hold.ticket

    async def _grow(self, hold: BudgetHold, size: int) -> None:
        size = max(0, min(int(size), self.capacity - hold.bytes))
        if size == 0:
            return
        async with self._condition:
            if not self._fits(hold, size):
                self.waiting += 1
                self._changed()
                try:
                    await self._condition.wait_for(lambda: self._fits(hold, size))
                finally:
                    self.waiting -= 1
            if hold.bytes == 0:
                self._holding[hold.ticket] = hold
                self.holders += 1
            hold.bytes += size
            self.in_use += size
            self.peak_bytes = max(self.peak_bytes, self.in_use)
            self.peak_holders = max(self.peak_holders, self.holders)
            self._changed()

    async def _release(self, hold: BudgetHold) -> None:
        if hold.bytes == 0:
            return
        async with self._condition:
            self.in_use -= hold.bytes
            self.holders -= 1
            hold.bytes = 0
            del self._holding[hold.ticket]
            self._condition.notify_all()
            self._changed()

    def hold(self, size: int = 0):
        """`async with budget.hold(n) as hold:` charges `n` bytes now (0: nothing yet; `await
        hold.grow(k)` as bytes arrive) and releases all of them at the end."""
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def holding():
            self._tickets += 1
            hold = BudgetHold(self, self._tickets)
            try:
                await hold.grow(size)
                yield hold
            finally:
                if hold.bytes:  # shielded: a cancelled request still gives its bytes back
                    await asyncio.shield(self._release(hold))

        return holding()

    def health(self) -> dict:
        """What `/healthz` shows: requests waiting on the budget, holding it, and its bytes."""
        return {"waiting": self.waiting, "holders": self.holders, "bytes": self.in_use,
                "capacity": self.capacity}


async def refuse_handshake(websocket, status: int, detail: str) -> None:
    """Refuse a WebSocket before `accept()` with an HTTP status (401/403/404) and a JSON body,
    through the ASGI `websocket.http.response` extension, so the client never gets to send a
    frame; where the server lacks it, accept and close with 4000 + status instead."""
    from starlette.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse({"detail": detail}, status_code=status,
                                                          headers=headers))
        return
    await websocket.accept()
    await websocket.close(code=4000 + status, reason=detail[:120])
