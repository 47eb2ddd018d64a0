"""An ingest message around a batch: run name, `seq`, `meta`, `events`, validated."""
from __future__ import annotations

import math
import unicodedata
from typing import Any

import orjson

from gradwatch.server.storage.registry import STEP_EVENT_KINDS
from gradwatch.server.wire.columns import parse_batch
from gradwatch.server.wire.models import (MAX_DETAIL_BYTES, MAX_EVENTS, MAX_JSON_DEPTH, MAX_META_BYTES,
                                          MAX_RUN_NAME, MAX_STEP, BatchError, IngestMessage)

MESSAGE_KEYS = frozenset({"type", "seq", "run", "batch", "meta", "events"})


def validate_run_name(name: Any) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_RUN_NAME:
        raise BatchError(f"run name must be 1 to {MAX_RUN_NAME} characters")
    if not name.strip():
        raise BatchError("run name must not be blank")
    if name in (".", ".."):
        raise BatchError(f"run name must not be {name!r} (it means a folder in a URL path)")
    if "/" in name:
        raise BatchError("run name must not contain '/'")
    if not name.isprintable():  # control, format (bidi overrides, zero-width), separators, unassigned
        bad = next(char for char in name if not char.isprintable())
        raise BatchError(f"run name must be printable: it holds U+{ord(bad):04X} "
                         f"({unicodedata.name(bad, 'a control or unassigned character')}) "
                         f"at index {name.index(bad)}")
    return name


def message_seq(message: Any) -> Any:
    """The message's `seq` to echo in the reply: an integer or a short string, else None
    (an echoed seq nested 300 deep could not even be written back)."""
    seq = message.get("seq") if isinstance(message, dict) else None
    if (type(seq) is int and -2**63 <= seq < 2**64) or (isinstance(seq, str) and len(seq) <= 200):
        return seq
    return None


def _finite_float(name: str, value: int | float) -> float:
    """A number as the float it means; 422 when it has none (2**1024) or is not finite."""
    try:
        number = float(value)
    except OverflowError:
        raise BatchError(f"field '{name}' is too large for a float") from None
    if not math.isfinite(number):
        raise BatchError(f"field '{name}' must be a finite number")
    return number


def check_json(name: str, value: Any, max_bytes: int) -> None:
    """422 when free-form JSON (`meta`, `detail`) nests deeper than MAX_JSON_DEPTH or is over
    `max_bytes` written out: both are stored and sent back to dashboards as they are."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise BatchError(f"field '{name}' nests deeper than {MAX_JSON_DEPTH} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    try:
        size = len(orjson.dumps(value))
    except (orjson.JSONEncodeError, TypeError) as error:
        raise BatchError(f"field '{name}' cannot be stored as JSON: {error}") from None
    if size > max_bytes:
        raise BatchError(f"field '{name}' is {size} bytes as JSON, more than {max_bytes}")


def parse_events(events: Any) -> list[dict] | None:
    """Validate the `events` of an ingest message (registry.EVENT_KINDS says which kinds
    name a step; other kinds up to 32 characters are kept as sent)."""
    if events is None:
        return None
    if not isinstance(events, list):
        raise BatchError("field 'events' must be a list")
    if len(events) > MAX_EVENTS:
        raise BatchError(f"field 'events' holds {len(events)} events, more than {MAX_EVENTS}")
    out = []
    for index, item in enumerate(events):
        if not isinstance(item, dict) or not isinstance(item.get("kind"), str) \
                or not 0 < len(item["kind"]) <= 32:
            raise BatchError(f"field 'events[{index}].kind' must be a string of 1 to 32 characters")
        step = item.get("step")
        if step is None and item["kind"] in STEP_EVENT_KINDS:
            raise BatchError(f"field 'events[{index}].step' is required for a {item['kind']!r} event")
        if step is not None and (type(step) is not int or not 0 <= step <= MAX_STEP):
            raise BatchError(f"field 'events[{index}].step' must be a step number (0 to 2**53 - 1)")
        message = item.get("message", "")
        if not isinstance(message, str):
            raise BatchError(f"field 'events[{index}].message' must be a string")
        value = item.get("value")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BatchError(f"field 'events[{index}].value' must be a number")
            value = _finite_float(f"events[{index}].value", value)
        detail = item.get("detail")
        if detail is not None:
            check_json(f"events[{index}].detail", detail, MAX_DETAIL_BYTES)
        out.append({"kind": item["kind"], "step": step, "message": message[:10_000],
                    "detail": detail, "value": value})
    return out


def check_message_fields(message: Any) -> None:
    """The message's shape before its parts: an object of known fields, of type 'batch'."""
    if not isinstance(message, dict):
        raise BatchError("a message must be a JSON object")
    unknown = sorted(set(message) - MESSAGE_KEYS)
    if unknown:
        raise BatchError(f"unknown field '{unknown[0]}' in the message")
    if message.get("type") != "batch":
        raise BatchError(f"field 'type' must be 'batch', got {message.get('type')!r}")


def parse_ingest_message(message: Any) -> IngestMessage:
    """Validate a decoded `/ws/ingest` message; raises BatchError naming the field."""
    check_message_fields(message)
    run = validate_run_name(message.get("run"))
    batch = parse_batch(message["batch"]) if message.get("batch") is not None else None
    meta = message.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise BatchError("field 'meta' must be an object")
    if meta is not None:
        check_json("meta", meta, MAX_META_BYTES)
    return IngestMessage(message.get("seq"), run, batch, meta, parse_events(message.get("events")))
