"""The wire format (docs/wire.md) as plain dicts and JSON text (orjson throughout).

The server's schemas are the validated version of this; here the agent only
builds what they accept: a columnar batch, a message around it, a drop event.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

import orjson

INGEST_PATH = "/ws/ingest"
_DUMPS_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY  # a user's config may hold either

# Columns the wire knows, and which of them are booleans.
FLOAT_COLUMNS = ("pre_norm", "post_norm", "scale", "threshold", "loss", "lr", "z", "ema", "robust_z")
BOOL_COLUMNS = ("clipped", "spike", "nonfinite", "skipped", "level_shift")


def ingest_url(url: str) -> str:
    """`http://host:port[/prefix]` (or ws://, https://, wss://) -> `ws://host:port[/prefix]/ws/ingest`."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"url must look like http://host:port, got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(INGEST_PATH):
        path += INGEST_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def wire_float(value: float) -> float | str:
    """A float as the wire spells it: finite numbers as numbers, the rest as strings."""
    if math.isfinite(value):
        return value
    if value != value:
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def wire_floats(values: Iterable[float]) -> list:
    isfinite = math.isfinite
    return [value if isfinite(value) else wire_float(value) for value in values]


def split_payload(payload: bytes, max_bytes: int) -> list[tuple[bytes, int]]:
    """A spooled batch payload cut by steps into payloads of at most `max_bytes` each
    (`[(payload, steps)]`; a single step over the budget stays one payload). Values are
    copied as parsed, so they print the same again."""
    body = orjson.loads(payload)
    batch = body.get("batch")
    steps = len(batch["step"]) if isinstance(batch, dict) and isinstance(batch.get("step"), list) else 0
    if len(payload) <= max_bytes or steps <= 1:
        return [(payload, steps)]
    parts: list[tuple[bytes, int]] = []
    pieces = min(steps, max(2, -(-len(payload) // max_bytes)))
    size = -(-steps // pieces)
    for start in range(0, steps, size):
        part: dict = {}
        for key, value in batch.items():
            if isinstance(value, list):
                part[key] = value[start:start + size]
            elif key == "tensor_norms" and isinstance(value, dict):
                part[key] = {"names": value.get("names"), "norms": value.get("norms", [])[start:start + size]}
            else:
                part[key] = value
        events = body.get("events") if start == 0 else None
        encoded = encode_payload(body.get("run"), part, events)
        parts.extend(split_payload(encoded, max_bytes) if len(encoded) > max_bytes else
                     [(encoded, len(part["step"]))])
    return parts


def encode_message(seq: int, payload: bytes, meta: dict | None = None) -> str:
    """One WebSocket text message: `{"type": "batch", "seq": ..., <payload fields>}`.

    `payload` is the JSON of `{"run": ..., "batch": ..., "events": ...}` as
    stored in the spool; it is spliced in as text, never parsed again.
    """
    head = '{"type":"batch","seq":%d,' % seq
    if meta is not None:
        head += '"meta":' + dumps(meta) + ","
    return head + payload.decode("utf-8")[1:]


def encode_payload(run: str, batch: dict | None = None, events: Sequence[dict] | None = None) -> bytes:
    body: dict = {"run": run}
    if batch is not None:
        body["batch"] = batch
    if events:
        body["events"] = list(events)
    return dumps(body).encode("utf-8")


def dumps(value) -> str:
    """Compact JSON text (orjson: a non-finite float becomes `null`, never a bare NaN token,
    which would be invalid JSON for the server)."""
    return orjson.dumps(value, option=_DUMPS_OPTIONS).decode("utf-8")


def loads(text: str | bytes):
    """Parse JSON text from the server or the spool (orjson, as everywhere on the wire)."""
    return orjson.loads(text)


def drop_event(step: int, dropped: dict[str, int]) -> dict:
    total = sum(dropped.values())
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(dropped.items()))
    return {"kind": "drop", "step": int(step),
            "message": f"agent dropped {total} step record(s): {reasons}",
            "detail": {"dropped": dict(dropped)}}
