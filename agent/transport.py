"""One WebSocket to the server's `/ws/ingest`, with errors sorted into two kinds.

`Refused`: the server will never take this data from us as configured (a
refused token, close code 4401/4403 or HTTP 401/403 at the handshake; or HTTP
404: no gradwatch server at that path). The sender reports it once and stops
trying. `TransportError`: anything else
(connection refused, reset, timeout, a 1011 close, a 503); the sender backs
off and tries again.
"""
from __future__ import annotations

import socket
import struct

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from .wire import WIRE_HEADER, binary_message_as_json, ingest_url, loads, server_root

REFUSED_CLOSE_CODES = (4401, 4403)
REFUSED_HTTP_STATUS = (401, 403)
NOT_HERE_HTTP_STATUS = 404  # the server answers an unknown WebSocket path with 404


class TransportError(Exception):
    """A transient failure: reconnect later. `code`: the server's WebSocket close code, if any
    (1009: a message was over the server's size limit)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class Stalled(TransportError):
    """The server accepted the connection but answered nothing within the send timeout."""


class Refused(Exception):
    """The server refuses our credentials (`reason` "token"), or nothing that takes
    batches is at the URL's path (`reason` "path"): do not retry."""

    def __init__(self, message: str, reason: str = "token"):
        super().__init__(message)
        self.reason = reason


class WebSocketTransport:
    """`url`: the server's address as the user gave it (`http://host:port`); `send_timeout`:
    seconds a send may block on a server that accepted the connection and stopped reading
    (the kernel's `SO_SNDTIMEO` on the socket, so the reading side is not affected)."""

    def __init__(self, url: str, token: str | None = None, open_timeout: float = 5.0,
                 max_message_bytes: int = 64 << 20, send_timeout: float = 30.0):
        self.base_url = url
        self.url = ingest_url(url)
        self.token = token
        self.open_timeout = open_timeout
        self.send_timeout = float(send_timeout)
        self.max_message_bytes = max_message_bytes
        self.refused: str | None = None  # "token" or "path" once the server refused us
        self.reads_binary = True  # the connected server reads binary frames (its handshake says so)
        self._connection: ClientConnection | None = None

    @property
    def connected(self) -> bool:
        return self._connection is not None

    def connect(self) -> None:
        self.adopt(self.open())

    def open(self) -> ClientConnection:
        """Open a connection without installing it (safe to call from another thread than the
        one that sends: the sender connects in a helper thread and keeps draining meanwhile)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            connection = connect(self.url, additional_headers=headers, open_timeout=self.open_timeout,
                                 close_timeout=1.0, compression=None, max_size=self.max_message_bytes)
            # Entered as a context manager (closed by `close()`): the form websockets >= 17 asks for.
            connection = connection.__enter__()
            _set_send_timeout(connection.socket, self.send_timeout)
            return connection
        except InvalidStatus as error:
            status = error.response.status_code
            if status in REFUSED_HTTP_STATUS:
                self.refused = "token"
                raise Refused(f"the server refused the token (HTTP {status} on {self.url})") from None
            if status == NOT_HERE_HTTP_STATUS:
                self.refused = "path"
                raise Refused(f"no gradwatch server at this path ({self.url}: HTTP 404); the URL is the "
                              f"server's address, e.g. {server_root(self.base_url)}", reason="path") from None
            raise TransportError(f"handshake answered HTTP {status}") from None
        except ConnectionClosed as error:
            raise self._closed(error, close=False) from None
        except (OSError, InvalidHandshake, WebSocketException, TimeoutError) as error:
            raise TransportError(f"cannot connect to {self.url}: {error}") from None

    def adopt(self, connection: ClientConnection) -> None:
        """Use a connection made by `open()` (closing any previous one)."""
        self.close()
        self._connection = connection
        response = getattr(connection, "response", None)
        wire = response.headers.get(WIRE_HEADER, "") if response is not None else ""
        self.reads_binary = "msgpack" in wire.lower()

    @staticmethod
    def discard(connection: ClientConnection) -> None:
        """Close a connection made by `open()` that will not be used."""
        try:
            connection.close()
        except (OSError, WebSocketException, RuntimeError):
            pass

    def push_url(self) -> str:
        """The URL a `gradwatch push` hint should name: the server's root when this path
        had no gradwatch server, else the URL as given."""
        return server_root(self.base_url) if self.refused == "path" else self.base_url

    def send(self, text: str | bytes) -> None:
        """One message: a text frame for JSON (str), a binary frame for msgpack (bytes)."""
        if self._connection is None:
            raise TransportError("not connected")
        if isinstance(text, bytes) and not self.reads_binary:
            text = binary_message_as_json(text)  # a server older than the binary wire
        try:
            self._connection.send(text)
        except ConnectionClosed as error:
            raise self._closed(error) from None
        except (OSError, WebSocketException) as error:  # a send past `send_timeout` lands here
            self.abandon()
            raise TransportError(f"send failed: {error}") from None

    def recv(self, timeout: float) -> dict | None:
        """The next message from the server as a dict, or None when none came within `timeout`."""
        if self._connection is None:
            raise TransportError("not connected")
        try:
            text = self._connection.recv(timeout=max(0.0, timeout))
        except TimeoutError:
            return None
        except ConnectionClosed as error:
            raise self._closed(error) from None
        except (OSError, WebSocketException) as error:
            self.close()
            raise TransportError(f"receive failed: {error}") from None
        try:
            message = loads(text)
        except ValueError:
            raise TransportError(f"the server sent something that is not JSON: {text[:200]!r}") from None
        return message if isinstance(message, dict) else {}

    def _closed(self, error: ConnectionClosed, close: bool = True) -> Exception:
        if close:
            self.close()
        frame = error.rcvd
        if frame is not None and frame.code in REFUSED_CLOSE_CODES:
            self.refused = "token"
            reason = f": {frame.reason}" if frame.reason else ""
            return Refused(f"the server refused the token (close code {frame.code}{reason})")
        if frame is None:
            return TransportError("connection closed (no close code)")
        return TransportError(f"connection closed (code {frame.code})", code=frame.code)

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except (OSError, WebSocketException, RuntimeError):
                pass

    def abandon(self) -> None:
        """Forget the connection without a closing handshake (in a forked child)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.socket.close()
            except OSError:
                pass




def _set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """A blocking send that moves no byte for `seconds` fails (EAGAIN) instead of hanging."""
    whole = int(seconds)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", whole, int((seconds - whole) * 1e6)))
    except OSError:
        pass
