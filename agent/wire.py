"""The wire format (docs/wire.md) as plain dicts and JSON text.

The server's schemas are the validated version of this; here the agent only
builds what they accept: a columnar batch, a message around it, a drop event.
"""
from __future__ import annotations

import json
import math
from typing import Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

INGEST_PATH = "/ws/ingest"

# Columns the wire knows, and which of them are booleans.
FLOAT_COLUMNS = ("pre_norm", "post_norm", "scale", "threshold", "loss", "lr", "z", "ema")
BOOL_COLUMNS = ("clipped", "spike", "nonfinite")


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


def http_url(url: str) -> str:
    """The server's base HTTP address for a url given as http(s):// or ws(s)://."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if path.endswith(INGEST_PATH):
        path = path[: -len(INGEST_PATH)]
    return urlunsplit((scheme, parts.netloc, path, "", ""))


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
    # allow_nan=False: a bare NaN token would be invalid JSON for the server.
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def drop_event(step: int, dropped: dict[str, int]) -> dict:
    total = sum(dropped.values())
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(dropped.items()))
    return {"kind": "drop", "step": int(step),
            "message": f"agent dropped {total} step record(s): {reasons}",
            "detail": {"dropped": dict(dropped)}}
