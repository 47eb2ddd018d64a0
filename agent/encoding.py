"""Step records -> the payloads of columnar batches (the wire format, docs/wire.md).

Records of one layout (the same columns and tensor names) become one batch; a
batch is cut by steps so that each payload stays within a byte budget (the
server's message limit). Two encodings of the same batch: msgpack with each
column a typed array of raw little-endian values (`encode_chunk_binary`, what the
agent sends: no text to write or parse per value), and JSON (`encode_chunk`, for
people; `GRADWATCH_WIRE=json` makes the agent send it).
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import msgpack
import numpy as np
import orjson

from .recorder import Layout, StepRecord
from .wire import BOOL_COLUMNS, typed_array, wire_floats

DEFAULT_BATCH_BYTES = 4 << 20  # encoded bytes per message; the server's default limit is 32 MiB
ENCODINGS = ("msgpack", "json")

_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def layout_runs(records: Sequence[StepRecord]) -> Iterator[Sequence[StepRecord]]:
    """Consecutive records of equal layout, as slices of `records`."""
    start = 0
    while start < len(records):
        layout = records[start].layout
        stop = start + 1
        while stop < len(records) and (records[stop].layout is layout or records[stop].layout == layout):
            stop += 1
        yield records[start:stop]
        start = stop


def _float_column(values: np.ndarray):
    """float32 values for orjson: the array itself when all finite (written as the shortest
    decimal that reads back as the same float32), else a list with the wire's strings."""
    if np.isfinite(values).all():
        return np.ascontiguousarray(values)
    return [value if np.isfinite(value) else _wire_string(value) for value in values]


def _wire_string(value: np.float32) -> str:
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


def encode_chunk(run: str, records: Sequence[StepRecord]) -> bytes:
    """Records of one layout -> the JSON payload of one columnar batch.

    Float32 values are written as the shortest decimal that reads back as the same float32
    (`0.1`, not `0.10000000149011612`): half the bytes, and exact for a reader that parses
    float64 and compares as float32. Python floats (`lr`, `loss` given as numbers) keep
    float64's shortest form.
    """
    layout: Layout = records[0].layout
    rows = np.frombuffer(b"".join(record.values for record in records), dtype="<f4")
    rows = rows.reshape(len(records), layout.width)
    batch: dict = {"step": [record.step for record in records],
                   "time": [round(record.time, 6) for record in records]}
    for index, name in enumerate(layout.columns):
        column = rows[:, index]
        batch[name] = np.ascontiguousarray(column != 0.0) if name in BOOL_COLUMNS else _float_column(column)
    for index, name in enumerate(layout.extra_columns):
        batch[name] = wire_floats(float(record.extras[index]) for record in records)
    if layout.tensor_names:
        block = rows[:, len(layout.columns):]
        norms = (np.ascontiguousarray(block) if np.isfinite(block).all()
                 else [_float_column(row) for row in block])
        batch["tensor_norms"] = {"names": list(layout.tensor_names), "norms": norms}
    return orjson.dumps({"run": run, "batch": batch}, option=_NUMPY)


def encode_chunk_binary(run: str, records: Sequence[StepRecord]) -> bytes:
    """Records of one layout -> the msgpack payload of one columnar batch: steps int64,
    `time` and Python-float extras float64, recorded values float32 as recorded (stored
    as exactly those float32 values), flags bool, tensor norms one float32 array row by
    row. NaN and Infinity are values of the arrays."""
    layout: Layout = records[0].layout
    rows = np.frombuffer(b"".join(record.values for record in records), dtype="<f4")
    rows = rows.reshape(len(records), layout.width)
    batch: dict = {"step": typed_array(np.fromiter((record.step for record in records), np.int64, len(records))),
                   "time": typed_array(np.fromiter((record.time for record in records), np.float64, len(records)))}
    for index, name in enumerate(layout.columns):
        column = rows[:, index]
        batch[name] = typed_array(column != 0.0 if name in BOOL_COLUMNS else column)
    for index, name in enumerate(layout.extra_columns):
        batch[name] = typed_array(np.fromiter((float(record.extras[index]) for record in records),
                                              np.float64, len(records)))
    if layout.tensor_names:
        batch["tensor_norms"] = {"names": list(layout.tensor_names),
                                 "norms": typed_array(rows[:, len(layout.columns):])}
    return msgpack.packb({"run": run, "batch": batch})


def default_encoding() -> str:
    """The agent's wire encoding: msgpack unless `GRADWATCH_WIRE=json`."""
    chosen = os.environ.get("GRADWATCH_WIRE", "msgpack").strip().lower()
    return chosen if chosen in ENCODINGS else "msgpack"


def _encoder(encoding: str | None):
    return encode_chunk if (encoding or default_encoding()) == "json" else encode_chunk_binary


def encode_within(run: str, records: Sequence[StepRecord], max_bytes: int,
                  encoding: str | None = None) -> list[tuple[bytes, int]]:
    """Records of one layout -> `[(payload, steps)]`, cut by steps so that each payload is at
    most `max_bytes` (a single step over it stays one payload). `encoding`: "msgpack" or
    "json" (None: `default_encoding()`)."""
    encode = _encoder(encoding)
    count = len(records)
    if count > 2:  # size the pieces from one and two steps (names and columns are per batch)
        one, two = len(encode(run, records[:1])), len(encode(run, records[:2]))
        per_step = max(1, two - one)
        fits = max(1, int((max_bytes - (one - per_step)) / per_step * 0.95))
        if fits < count:
            out: list[tuple[bytes, int]] = []
            for start in range(0, count, fits):
                out.extend(_encode_checked(encode, run, records[start:start + fits], max_bytes))
            return out
    return _encode_checked(encode, run, records, max_bytes)


def _encode_checked(encode, run: str, records: Sequence[StepRecord], max_bytes: int) -> list[tuple[bytes, int]]:
    payload = encode(run, records)
    if len(payload) <= max_bytes or len(records) == 1:
        return [(payload, len(records))]
    half = len(records) // 2
    return (_encode_checked(encode, run, records[:half], max_bytes)
            + _encode_checked(encode, run, records[half:], max_bytes))


def encode_batches(run: str, records: Sequence[StepRecord], max_bytes: int = DEFAULT_BATCH_BYTES,
                   encoding: str | None = None) -> list[tuple[bytes, int]]:
    """Records -> `[(payload, step count)]`: one columnar batch per run of equal layouts,
    cut so that each payload is at most `max_bytes`."""
    out = []
    for chunk in layout_runs(records):
        out.extend(encode_within(run, chunk, max_bytes, encoding))
    return out
