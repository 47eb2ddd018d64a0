"""Chunk codec: a run's steps in fixed spans of CHUNK consecutive step numbers,
each column packed as bytes.

Why chunks: one row per step makes a million-step read a million rows; one row
per chunk of 4,096 steps makes it 245 rows whose columns are `np.frombuffer`
away from arrays. Chunk `c` holds steps `[c*CHUNK, (c+1)*CHUNK)`; a chunk may
be sparse (a resumed run, a replayed spool), so the steps present are stored
too: as uint16 offsets when few, as a CHUNK-bit presence bitmap otherwise.

Column blob layout (little endian), `n` = steps present in the chunk:

    byte 0   code: low nibble = storage (F32, F64, BOOL, I32, I64, NULL),
             VALID (0x10) = a validity bitmap follows, ZLIB (0x20) = the rest is zlib'ed
    [ceil(n/8) bytes]  validity bitmap (np.packbits, little bit order), when VALID
    data     F32/F64: n floats; BOOL: n bits packed; I32/I64: n ints; NULL: nothing

A float column is stored as float32 only when every value of the chunk
round-trips bit for bit through float32 (NaN, ±Inf and -0.0 do); else float64.
A missing value (null) is kept apart from NaN by the validity bitmap; its slot
holds 0 so it never forces float64. Decoded float columns hold NaN at the
missing slots, bool columns False, int columns 0: always read `valid` too.

Columns are described by a spec, `{name: "float" | "bool" | "int"}`, so the
server's column registry drives the codec and this module knows no names.
No per-value Python loops: every path is a handful of vectorised numpy calls.
"""
from __future__ import annotations

import functools
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

CHUNK = 4096          # steps per chunk (chunk id = step // CHUNK)
BLOCK = 64            # steps per summary block (CHUNK // BLOCK blocks per chunk)
KINDS = ("float", "bool", "int")
Spec = Mapping[str, str]

F32, F64, BOOL, I32, I64, NULL = 1, 2, 3, 4, 5, 6
VALID, ZLIB = 0x10, 0x20
_STEPS_OFFSETS, _STEPS_BITMAP = 1, 2
_BITMAP_BYTES = CHUNK // 8
_I32 = np.iinfo(np.int32)


class CodecError(ValueError):
    """A blob that does not decode (truncated, unknown code, wrong length)."""


def check_spec(spec: Spec) -> None:
    for name, kind in spec.items():
        if kind not in KINDS:
            raise ValueError(f"column '{name}': kind must be one of {KINDS}, got {kind!r}")
        if name == "step":
            raise ValueError("'step' is not a value column")


@dataclass
class Chunk:
    """The decoded steps of one chunk: sorted absolute steps, one array per column.

    `values[name]` is float64 / bool / int64 by kind, `valid[name]` a bool mask
    of the non-null slots or None when every slot holds a value.
    """

    chunk_id: int
    steps: np.ndarray
    values: dict[str, np.ndarray] = field(default_factory=dict)
    valid: dict[str, np.ndarray | None] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.steps)

    @classmethod
    def empty(cls, chunk_id: int, spec: Spec) -> "Chunk":
        return cls(chunk_id, np.zeros(0, np.int64), {n: empty_values(k, 0) for n, k in spec.items()},
                   {n: None for n in spec})

    def nbytes(self) -> int:
        """Memory held, for caches bounded in bytes."""
        total = self.steps.nbytes
        for name, values in self.values.items():
            total += values.nbytes + (self.valid[name].nbytes if self.valid.get(name) is not None else 0)
        return total


def empty_values(kind: str, n: int) -> np.ndarray:
    if kind == "float":
        return np.full(n, np.nan)
    return np.zeros(n, dtype=bool if kind == "bool" else np.int64)


def chunk_ids(steps: np.ndarray) -> np.ndarray:
    return np.asarray(steps, dtype=np.int64) // CHUNK


def split_by_chunk(steps: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """[(chunk_id, row indices of `steps` in that chunk)], chunks ascending; any row order in."""
    ids = chunk_ids(steps)
    if not len(ids):
        return []
    if ids.min() == ids.max():   # one chunk (most batches): no sort
        return [(int(ids[0]), np.arange(len(ids)))]
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    bounds = np.concatenate(([0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1, [len(ordered)]))
    return [(int(ordered[a]), order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


# ----- steps -----

def encode_steps(chunk_id: int, steps: np.ndarray) -> bytes:
    """Sorted unique steps of one chunk as offsets (few steps) or a presence bitmap."""
    offsets = np.asarray(steps, dtype=np.int64) - chunk_id * CHUNK
    if len(offsets) and (offsets[0] < 0 or offsets[-1] >= CHUNK):
        raise ValueError(f"steps outside chunk {chunk_id}")
    if len(offsets) * 2 < _BITMAP_BYTES:
        return bytes([_STEPS_OFFSETS]) + offsets.astype("<u2").tobytes()
    present = np.zeros(CHUNK, dtype=bool)
    present[offsets] = True
    return bytes([_STEPS_BITMAP]) + np.packbits(present, bitorder="little").tobytes()


def decode_steps(chunk_id: int, blob: bytes) -> np.ndarray:
    if not blob:
        raise CodecError("empty steps blob")
    body = memoryview(blob)[1:]
    if blob[0] == _STEPS_OFFSETS:
        if len(body) % 2:
            raise CodecError("steps blob has an odd length")
        offsets = np.frombuffer(body, dtype="<u2").astype(np.int64)
    elif blob[0] == _STEPS_BITMAP:
        if len(body) != _BITMAP_BYTES:
            raise CodecError(f"steps bitmap must be {_BITMAP_BYTES} bytes, got {len(body)}")
        offsets = np.flatnonzero(np.unpackbits(np.frombuffer(body, np.uint8), bitorder="little"))
    else:
        raise CodecError(f"unknown steps code {blob[0]}")
    return offsets + chunk_id * CHUNK


_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.int64)


def decode_segment_steps(chunk_id: int, blobs: list[bytes]) -> tuple[np.ndarray, list[int]]:
    """The steps of a chunk stored in segments (disjoint, ascending: the segments' step blobs in
    order) and how many each segment holds, from one presence bitmap: a segment's bitmap is
    OR-ed in and counted, not expanded to its steps (a 500-step segment's bitmap is 4,096 bits)."""
    present = np.zeros(_BITMAP_BYTES, np.uint8)
    counts = []
    for blob in blobs:
        if blob[:1] == bytes([_STEPS_BITMAP]):
            bits = np.frombuffer(memoryview(blob)[1:], np.uint8)
            if len(bits) != _BITMAP_BYTES:
                raise CodecError(f"steps bitmap must be {_BITMAP_BYTES} bytes, got {len(bits)}")
            present |= bits
            counts.append(int(_POPCOUNT[bits].sum()))
        else:
            offsets = decode_steps(chunk_id, blob) - chunk_id * CHUNK
            present |= np.packbits(np.bincount(offsets, minlength=CHUNK).astype(bool), bitorder="little")
            counts.append(len(offsets))
    steps = np.flatnonzero(np.unpackbits(present, bitorder="little")) + chunk_id * CHUNK
    if len(steps) != sum(counts):
        raise CodecError(f"chunk {chunk_id}: its segments share steps")
    return steps, counts


# ----- columns -----

def fits_float32(values: np.ndarray) -> bool:
    """True when every float64 value survives float64 -> float32 -> float64 bit for bit."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    back = values.astype(np.float32).astype(np.float64)
    return bool(np.array_equal(back.view(np.uint64), values.view(np.uint64)))


def encode_column(kind: str, values: np.ndarray, valid: np.ndarray | None = None, level: int = 0) -> bytes:
    """One column of one chunk as bytes; `level` > 0 zlib-compresses the payload."""
    n = len(values)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.all():
            valid = None
        elif not valid.any():
            return bytes([NULL])
    if kind == "float":
        values = np.asarray(values, dtype=np.float64)
        if valid is not None:
            values = np.where(valid, values, 0.0)
        if fits_float32(values):
            code, data = F32, values.astype("<f4").tobytes()
        else:
            code, data = F64, values.astype("<f8").tobytes()
    elif kind == "bool":
        values = np.asarray(values, dtype=bool)
        if valid is not None:
            values = values & valid
        code, data = BOOL, np.packbits(values, bitorder="little").tobytes()
    elif kind == "int":
        values = np.asarray(values, dtype=np.int64)
        if valid is not None:
            values = np.where(valid, values, 0)
        if n == 0 or (values.min() >= _I32.min and values.max() <= _I32.max):
            code, data = I32, values.astype("<i4").tobytes()
        else:
            code, data = I64, values.astype("<i8").tobytes()
    else:
        raise ValueError(f"unknown kind {kind!r}")
    if valid is not None:
        code |= VALID
        data = np.packbits(valid, bitorder="little").tobytes() + data
    if level > 0:
        packed = zlib.compress(data, level)
        if len(packed) < len(data):
            code, data = code | ZLIB, packed
    return bytes([code]) + data


def decode_column(kind: str, blob: bytes, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, valid) of a column of `n` slots; see the module docstring for the fill values."""
    if not blob:
        raise CodecError("empty column blob")
    code = blob[0]
    storage = code & 0x0F
    if storage == NULL:
        return empty_values(kind, n), np.zeros(n, dtype=bool)
    body = memoryview(blob)[1:]
    if code & ZLIB:
        body = memoryview(zlib.decompress(body))
    valid = None
    if code & VALID:
        size = (n + 7) // 8
        valid = np.unpackbits(np.frombuffer(body[:size], np.uint8), count=n, bitorder="little").astype(bool)
        body = body[size:]
    expected = {F32: 4 * n, F64: 8 * n, BOOL: (n + 7) // 8, I32: 4 * n, I64: 8 * n}.get(storage)
    if expected is None:
        raise CodecError(f"unknown column code {code:#x}")
    if len(body) != expected:
        raise CodecError(f"column data is {len(body)} bytes, expected {expected} for {n} values")
    if storage in (F32, F64):
        if kind != "float":
            raise CodecError(f"float data in a {kind} column")
        values = np.frombuffer(body, "<f4" if storage == F32 else "<f8").astype(np.float64)
        if valid is not None:
            values[~valid] = np.nan
    elif storage == BOOL:
        if kind != "bool":
            raise CodecError(f"bool data in a {kind} column")
        values = np.unpackbits(np.frombuffer(body, np.uint8), count=n, bitorder="little").astype(bool)
    else:
        if kind != "int":
            raise CodecError(f"int data in a {kind} column")
        values = np.frombuffer(body, "<i4" if storage == I32 else "<i8").astype(np.int64)
    return values, valid


def column_storage(blob: bytes) -> str:
    """'float32', 'float64', 'bool', 'int32', 'int64' or 'null': what a blob holds (for reports/tests)."""
    return {F32: "float32", F64: "float64", BOOL: "bool", I32: "int32", I64: "int64",
            NULL: "null"}[blob[0] & 0x0F]


# ----- chunks -----

def encode_chunk(chunk: Chunk, spec: Spec, level: int = 0) -> dict[str, bytes]:
    """{'step': steps blob, name: column blob, ...} for every column of `spec`
    (a column the chunk lacks is stored as all null)."""
    out = {"step": encode_steps(chunk.chunk_id, chunk.steps)}
    n = len(chunk.steps)
    for name, kind in spec.items():
        if name in chunk.values:
            out[name] = encode_column(kind, chunk.values[name], chunk.valid.get(name), level)
        else:
            out[name] = bytes([NULL]) if n else encode_column(kind, empty_values(kind, 0))
    return out


def decode_segments(chunk_id: int, segments: list[Mapping[str, bytes]], spec: Spec,
                    columns: tuple[str, ...] | None = None) -> Chunk:
    """A chunk stored as segments (each a `{'step': ..., name: ...}` of `encode_chunk`, disjoint
    ascending steps, in order) decoded as one chunk: each segment's columns decoded and the
    segments joined, with the steps read at once (`decode_segment_steps`)."""
    steps, counts = decode_segment_steps(chunk_id, [segment["step"] for segment in segments])
    names = columns if columns is not None else tuple(spec)
    bounds = np.cumsum([0, *counts])
    parts = [_decode_columns(Chunk(chunk_id, steps[a:b]), segment, spec, names)
             for segment, a, b in zip(segments, bounds[:-1], bounds[1:])]
    return join_segments(chunk_id, parts, names)


def join_segments(chunk_id: int, parts: list[Chunk], columns: tuple[str, ...]) -> Chunk:
    """Segments of one chunk (ascending, disjoint step ranges) as one chunk."""
    joined = Chunk(chunk_id, np.concatenate([p.steps for p in parts]))
    for name in columns:
        joined.values[name] = np.concatenate([p.values[name] for p in parts])
        oks = [p.valid.get(name) for p in parts]
        joined.valid[name] = None if all(ok is None for ok in oks) else np.concatenate(
            [np.ones(len(p.steps), bool) if ok is None else ok for p, ok in zip(parts, oks)])
    return joined


def decode_chunk(chunk_id: int, blobs: Mapping[str, bytes], spec: Spec,
                 columns: tuple[str, ...] | None = None) -> Chunk:
    """Decode the steps and the wanted columns (all of `spec` by default); a column
    of `spec` missing from `blobs` (added to the registry later) decodes as all null."""
    chunk = Chunk(chunk_id, decode_steps(chunk_id, blobs["step"]))
    return _decode_columns(chunk, blobs, spec, columns if columns is not None else tuple(spec))


def _decode_columns(chunk: Chunk, blobs: Mapping[str, bytes], spec: Spec, columns: tuple[str, ...]) -> Chunk:
    """`columns` of `blobs` decoded into `chunk` (its steps set); a column without a blob is all null."""
    n = len(chunk.steps)
    for name in columns:
        kind = spec[name]
        blob = blobs.get(name)
        if blob is None:
            chunk.values[name], chunk.valid[name] = empty_values(kind, n), np.zeros(n, dtype=bool)
        else:
            chunk.values[name], chunk.valid[name] = decode_column(kind, blob, n)
    return chunk


# ----- several arrays in one blob (summaries, the one-blob-per-chunk variant) -----

_MAGIC = b"GWA1"


def pack_arrays(arrays: Mapping[str, np.ndarray | bytes]) -> bytes:
    """Named numpy arrays (or raw bytes) in one blob: magic, header length, JSON header, 8-aligned data."""
    header = []
    parts: list = []
    offset = 0
    for name, array in arrays.items():
        if isinstance(array, (bytes, bytearray, memoryview)):
            data, dtype, shape = memoryview(array).cast("B"), "bytes", [len(array)]
        else:
            array = np.ascontiguousarray(array)
            if array.dtype.byteorder == ">":
                array = array.astype(array.dtype.newbyteorder("<"))
            # the array's own buffer: one copy in all, by the join below (a tensor chunk is ~1 MB)
            data, dtype, shape = array.reshape(-1).view(np.uint8).data, array.dtype.newbyteorder("<").str, \
                list(array.shape)
        pad = -len(data) % 8
        header.append([name, dtype, shape, offset, len(data)])
        parts.append(data)
        if pad:
            parts.append(b"\0" * pad)
        offset += len(data) + pad
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return b"".join([_MAGIC, struct.pack("<I", len(text)), text, *parts])


@functools.lru_cache(maxsize=256)
def _header(text: bytes) -> list:
    """A packed blob's parsed header; the blobs of full chunks share theirs, so it is parsed once."""
    return json.loads(text)


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray | bytes]:
    """Inverse of `pack_arrays`; arrays are read-only views of `blob` (no copy)."""
    if blob[:4] != _MAGIC:
        raise CodecError("not a packed-arrays blob")
    (size,) = struct.unpack_from("<I", blob, 4)
    header = _header(bytes(blob[8:8 + size]))
    base = 8 + size
    view = memoryview(blob)
    out: dict[str, np.ndarray | bytes] = {}
    for name, dtype, shape, offset, length in header:
        data = view[base + offset: base + offset + length]
        if dtype == "bytes":
            out[name] = bytes(data)
        else:
            out[name] = np.frombuffer(data, dtype=dtype).reshape(shape)
    return out
