"""The wire room: ingest bodies decoded and validated, in two encodings with one schema.

- `json_decode`: `application/json` bodies and WebSocket text frames (orjson; for people
  and curl, small by default);
- `msgpack_decode`: `application/msgpack` bodies and WebSocket binary frames (the agent's;
  columns as typed arrays read in place, bounded memory whatever the body holds);
- `columns`, `messages`: the one schema both meet (a batch's columns; the message around
  it), with the same refusals in the same words;
- `models`: what a decoded body becomes (`Batch`, `Column`, `IngestMessage`, `BatchError`).
- `responses`: the JSON shapes the API answers with (the response models, OpenAPI at
  `/docs`); handlers build plain dicts.

docs/wire.md is the prose version of this package.
"""
from __future__ import annotations

from typing import Any

from gradwatch.server.wire import json_decode, msgpack_decode
from gradwatch.server.wire.columns import BATCH_KEYS, parse_batch
from gradwatch.server.wire.messages import (MESSAGE_KEYS, check_json, message_seq, parse_events,
                                            parse_ingest_message, validate_run_name)
from gradwatch.server.wire.models import (MAX_DETAIL_BYTES, MAX_EVENTS, MAX_JSON_DEPTH, MAX_META_BYTES,
                                          MAX_RUN_NAME, MAX_STEP, NORM_FIELDS, Batch, BatchError, Column,
                                          IngestMessage)

JSON_MEDIA_TYPE = json_decode.MEDIA_TYPE
MSGPACK_MEDIA_TYPE = msgpack_decode.MEDIA_TYPE
MEDIA_TYPES = (JSON_MEDIA_TYPE, MSGPACK_MEDIA_TYPE)


def load_batch(body: bytes | bytearray | memoryview, media_type: str) -> Batch:
    """A `POST /api/runs/{run}/steps` body in either encoding -> a validated Batch."""
    if media_type == MSGPACK_MEDIA_TYPE:
        return msgpack_decode.load_batch(body)
    return json_decode.load_batch(body)


def load_message(frame: str | bytes) -> tuple[Any, IngestMessage]:
    """A `/ws/ingest` frame -> (seq, message): a text frame is JSON, a binary one msgpack."""
    if isinstance(frame, str):
        return json_decode.load_message(frame)
    return msgpack_decode.load_message(frame)


__all__ = ["BATCH_KEYS", "JSON_MEDIA_TYPE", "MAX_DETAIL_BYTES", "MAX_EVENTS", "MAX_JSON_DEPTH", "MAX_META_BYTES",
           "MAX_RUN_NAME", "MAX_STEP", "MEDIA_TYPES", "MESSAGE_KEYS", "MSGPACK_MEDIA_TYPE", "NORM_FIELDS", "Batch",
           "BatchError", "Column", "IngestMessage", "check_json", "json_decode", "load_batch", "load_message",
           "message_seq", "msgpack_decode", "parse_batch", "parse_events", "parse_ingest_message",
           "validate_run_name"]
