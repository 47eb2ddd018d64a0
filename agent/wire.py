"""The wire format (docs/wire.md): plain dicts, JSON text (orjson) and msgpack.

The server's `gradwatch.server.wire` is the validated version of this; here the
agent only builds what it accepts: a columnar batch, a message around it, a drop
event. A batch payload is JSON text (`{...`) or msgpack (a map: its first byte is
never `{`), and keeps its encoding all the way: a JSON one goes in a WebSocket text
frame, a msgpack one in a binary frame.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

import msgpack
import numpy as np
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


def server_root(url: str) -> str:
    """`http://host:port/any/path` -> `http://host:port` (the scheme as given)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


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


EXT_ARRAY = 1  # msgpack extension type of a typed array: an 8-byte dtype tag, then raw little-endian values
TAG_BYTES = 8


def typed_array(values: np.ndarray) -> msgpack.ExtType:
    """A column as the binary wire's typed array (2-D: row by row)."""
    array = np.ascontiguousarray(values)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    tag = array.dtype.str.encode().ljust(TAG_BYTES, b"\0")
    return msgpack.ExtType(EXT_ARRAY, b"".join((tag, memoryview(array.reshape(-1)).cast("B"))))  # one copy


def _from_ext(code: int, data: bytes):
    if code != EXT_ARRAY:
        return msgpack.ExtType(code, data)
    return np.frombuffer(data, dtype=np.dtype(bytes(data[:TAG_BYTES]).rstrip(b"\0").decode()), offset=TAG_BYTES)


def is_binary(payload: bytes) -> bool:
    """True for a msgpack payload, False for JSON text."""
    return bool(payload) and payload[:1] != b"{"


def load_payload(payload: bytes) -> dict:
    """A payload this agent wrote, either encoding, as a dict (typed arrays as numpy arrays)."""
    if is_binary(payload):
        return msgpack.unpackb(payload, ext_hook=_from_ext)
    return orjson.loads(payload)


WIRE_HEADER = "X-Gradwatch-Wire"  # the server's handshake answer names the encodings it reads


def _json_cells(values) -> list:
    """A decoded column as the JSON wire spells it (non-finite floats as strings)."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    return wire_floats(values) if values and isinstance(values[0], float) else values


def binary_message_as_json(message: bytes) -> str:
    """A binary (msgpack) message as the same message in JSON text, for a server that reads
    only JSON (one older than the binary wire: its handshake names no encodings)."""
    body = msgpack.unpackb(message, ext_hook=_from_ext)
    batch = body.get("batch")
    if isinstance(batch, dict):
        out = {}
        for key, value in batch.items():
            if key == "tensor_norms":
                width = len(value["names"])
                norms = np.asarray(value["norms"]).reshape(-1, width)
                out[key] = {"names": value["names"], "norms": [_json_cells(row) for row in norms]}
            else:
                out[key] = _json_cells(value)
        body["batch"] = out
    return dumps(body)


def _split_binary(payload: bytes, max_bytes: int) -> list[tuple[bytes, int]]:
    body = load_payload(payload)
    batch = body["batch"]
    steps = len(batch["step"])
    if len(payload) <= max_bytes or steps <= 1:
        return [(payload, steps)]
    size = -(-steps // min(steps, max(2, -(-len(payload) // max_bytes))))
    parts: list[tuple[bytes, int]] = []
    for start in range(0, steps, size):
        part = {}
        for key, value in batch.items():
            if key == "tensor_norms":
                width = len(value["names"])
                norms = value["norms"].reshape(-1, width)[start:start + size]
                part[key] = {"names": value["names"], "norms": typed_array(norms)}
            else:
                part[key] = typed_array(value[start:start + size]) if isinstance(value, np.ndarray) \
                    else value[start:start + size]
        piece: dict = {"run": body["run"], "batch": part}
        if start == 0 and body.get("events"):
            piece["events"] = body["events"]
        encoded = msgpack.packb(piece)
        count = min(size, steps - start)
        parts.extend(_split_binary(encoded, max_bytes) if len(encoded) > max_bytes else [(encoded, count)])
    return parts


def split_payload(payload: bytes, max_bytes: int) -> list[tuple[bytes, int]]:
    """A spooled batch payload cut by steps into payloads of at most `max_bytes` each
    (`[(payload, steps)]`; a single step over the budget stays one payload), in the
    payload's own encoding. JSON values are copied as parsed, so they print the same again."""
    if is_binary(payload):
        return _split_binary(payload, max_bytes)
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


def encode_message(seq: int, payload: bytes, meta: dict | None = None) -> str | bytes:
    """One WebSocket message: `{"type": "batch", "seq": ..., <payload fields>}`, as text
    for a JSON payload, as bytes (a binary frame) for a msgpack one.

    `payload` is `{"run": ..., "batch": ..., "events": ...}` as stored in the spool; it
    is spliced in, never decoded again (msgpack: a new map header, the new fields, then
    the payload's fields as they are).
    """
    if is_binary(payload):
        unpacker = msgpack.Unpacker()
        unpacker.feed(payload[:16])
        count = unpacker.read_map_header()
        fields = {"type": "batch", "seq": seq}
        if meta is not None:
            fields["meta"] = orjson.loads(dumps(meta))  # as JSON would carry it (numpy values, int keys)
        packer = msgpack.Packer()
        head = packer.pack_map_header(count + len(fields))
        head += b"".join(packer.pack(key) + packer.pack(value) for key, value in fields.items())
        return head + payload[unpacker.tell():]
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
