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


def presented_token(headers, query_params) -> str | None:
    """`Authorization: Bearer T` or, for WebSockets and download links, `?token=T`."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return query_params.get("token") or None


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
