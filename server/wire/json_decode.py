"""The JSON encoding (`application/json`, WebSocket text frames): orjson, then the schema.

JSON is for people and curl; the agent sends the binary encoding (`msgpack_decode`).
`orjson.loads` builds a Python object per value before the schema can look at it, so a
JSON body is small (MAX_JSON_BODY) and is charged PARSE_FACTOR times its size
against the server's parse budget (a 64-byte dict per 3 bytes of a hostile body: 36x,
measured in tests/test_server_parse_memory.py).
"""
from __future__ import annotations

from typing import Any

import orjson

from gradwatch.server.wire.columns import parse_batch
from gradwatch.server.wire.messages import message_seq, parse_ingest_message
from gradwatch.server.wire.models import Batch, BatchError, IngestMessage

MEDIA_TYPE = "application/json"
MAX_JSON_BODY = 8 << 20   # bytes: a JSON body (or text frame) over this gets 413
PARSE_FACTOR = 36         # a JSON body is charged this many times its size while parsed (a list of `{}`: 36x)


def _loads(data: bytes | bytearray | memoryview | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise BatchError(f"invalid JSON: {error}") from None


def load_batch(data: bytes | bytearray | memoryview | str) -> Batch:
    """A JSON `POST /api/runs/{run}/steps` body -> a validated Batch (BatchError: 422)."""
    return parse_batch(_loads(data))


def load_message(data: bytes | bytearray | memoryview | str) -> tuple[Any, IngestMessage]:
    """A `/ws/ingest` text frame -> (its seq, the validated message); a BatchError carries
    `seq` (None when the message has none or could not be read)."""
    decoded = _loads(data)
    seq = message_seq(decoded)
    try:
        return seq, parse_ingest_message(decoded)
    except BatchError as error:
        error.seq = seq
        raise
