"""The binary encoding (`application/msgpack`, WebSocket binary frames), decoded by the
msgpack library with its own limits, in bounded memory whatever the body holds.

The same message and batch as JSON (docs/wire.md), in msgpack. A column may be a
typed array: msgpack extension type 1 (`EXT_ARRAY`) whose data is an 8-byte dtype tag
(`<f4`, `<f8`, `<i8`, `<u8`, `|b1`, NUL-padded) followed by the values as raw
little-endian bytes; `tensor_norms.norms` is one such array of float32, row by row
(steps x names). A typed array is read in place, a numpy view of the body (no copy,
no object per value, never converted), so it has one dtype per kind of column: steps
int64/uint64, float columns float32/float64, bool columns bool, tensor norms float32.

How the memory stays bounded (tests/test_server_parse_memory.py measures it):
1. the skeleton: msgpack's streaming `Unpacker` reads the map headers and keys of the
   message, the batch and `tensor_norms`, and `skip()`s every value, noting where it
   starts and ends (`tell()`); nothing is built but the keys;
2. each value is then decoded from its own slice of the body: a typed array as a view
   (the library hands the extension's data to `ext_hook` as a transient copy, which
   is only measured); anything else ("plain" values: `meta`, `events`, a column sent as
   a msgpack array) is charged PLAIN_COST bytes per byte of its slice against an
   allowance of PLAIN_SHARE of the body plus PLAIN_SLACK (a 1-byte empty map becomes a
   ~72-byte dict: no msgpack value costs more per byte), and refused past it; tensor
   names are read one by one with containers refused, charged per name.
So parsing holds the body's typed arrays in place, plain values within the allowance
and the checks' small temporaries: about 1x the body at the peak (the skeleton's copy
of the body while it is read; the unpackers start with a small buffer, not msgpack's
default 1 MiB, which would be another 1x of a 1 MiB body), ≤ 1.5x the body plus
PLAIN_SLACK for any body.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from gradwatch.server.wire.columns import BATCH_KEYS, parse_batch
from gradwatch.server.wire.messages import (MESSAGE_KEYS, check_json, check_message_fields, message_seq,
                                            parse_events, validate_run_name)
from gradwatch.server.wire.models import MAX_META_BYTES, MAX_TENSOR_NAME, Batch, BatchError, IngestMessage
from gradwatch.server.storage.registry import REQUIRED_FIELDS

MEDIA_TYPE = "application/msgpack"
EXT_ARRAY = 1
TAG_BYTES = 8
DTYPES = {tag: np.dtype(tag) for tag in ("<f4", "<f8", "<i8", "<u8", "|b1")}
PLAIN_COST = 80              # bytes of Python objects per byte of a plain msgpack value, at most
PLAIN_SHARE = 0.25           # plain values may cost this share of the body...
PLAIN_SLACK = 8 << 20        # ...plus this much (a `meta` of 64 KiB, a few events)
NAME_COST = 96               # bytes per tensor name beyond its text (a str object and its slot)
SMALL_VALUE = 4096           # `seq`, `type`: decoded only up to this many bytes
KEY_BYTES = 1024             # a map key longer than this is refused
_PROBE_LIMITS = {"max_str_len": 0, "max_bin_len": 0, "max_array_len": 0, "max_map_len": 0}
_NAME_LIMITS = {"max_str_len": 4 * MAX_TENSOR_NAME, "max_bin_len": 0, "max_array_len": 0, "max_map_len": 0,
                "max_ext_len": 0}
_PLAIN_LIMITS = {"max_bin_len": 0, "max_str_len": 1 << 20}  # no bin in the schema; strings up to 1 MiB
_UNPACK_ERRORS = (ValueError, msgpack.UnpackException)


@dataclass
class Section:
    """Where one value lies in the body; `members`: the sections of a map's values."""

    start: int
    end: int
    members: dict[str, "Section"] | None = field(default=None)

    @property
    def size(self) -> int:
        return self.end - self.start


class _Ext:
    """What `ext_hook` saw: the code, the data's length and its dtype tag."""

    def __init__(self, code: int, data: bytes):
        self.code, self.length = code, len(data)
        self.tag = bytes(data[:TAG_BYTES]).rstrip(b"\0").decode("ascii", "replace")


def invalid(error: Exception) -> BatchError:
    what = {msgpack.OutOfData: "the data ends inside a value", msgpack.ExtraData: "extra data after the value",
            msgpack.FormatError: "a byte that starts no msgpack value", msgpack.StackError: "nested too deep"}
    detail = what.get(type(error)) or str(error) or type(error).__name__
    return BatchError(f"invalid msgpack: {detail}")


def skeleton(data: bytes | bytearray | memoryview, descend: dict[str, dict]) -> Section:
    """The sections of the top-level value and, for maps, of the members named in
    `descend` (a tree of keys: `{"batch": {"tensor_norms": {}}}`). Builds only keys."""
    # read_size: the buffer the unpacker starts with (1 MiB by default), replaced by one of the
    # body's size at `feed`; a small one keeps the peak at one copy of the body, not 1 MiB more.
    unpacker = msgpack.Unpacker(max_buffer_size=max(1, len(data)), read_size=max(1, min(len(data), 4096)),
                                max_str_len=KEY_BYTES, max_bin_len=0, max_array_len=0, max_map_len=0,
                                max_ext_len=0)
    try:
        unpacker.feed(data)
        top = _section(unpacker, descend)
        if unpacker.tell() != len(data):
            raise msgpack.ExtraData(None, None)
    except BatchError:
        raise
    except _UNPACK_ERRORS as error:
        raise invalid(error) from None
    return top


def _section(unpacker: msgpack.Unpacker, descend: dict | None) -> Section:
    start = unpacker.tell()
    if descend is None:
        unpacker.skip()
        return Section(start, unpacker.tell())
    try:
        count = unpacker.read_map_header()
    except ValueError:  # not a map: its section, for the validation to name its type
        unpacker.skip()
        return Section(start, unpacker.tell())
    members: dict[str, Section] = {}
    for _ in range(count):
        try:
            key = unpacker.unpack()
        except ValueError:
            raise BatchError("invalid msgpack: a map key must be a string of at most "
                             f"{KEY_BYTES} bytes") from None
        if not isinstance(key, str):
            raise BatchError(f"invalid msgpack: a map key must be a string, got {type(key).__name__}")
        members[key] = _section(unpacker, descend.get(key))  # a repeated key: the last one counts, as in JSON
    return Section(start, unpacker.tell(), members)


class Reader:
    """Values of one body, decoded from their sections within the plain allowance."""

    def __init__(self, data: bytes | bytearray | memoryview):
        self.view = memoryview(data)
        self.allowance = PLAIN_SHARE * len(self.view) + PLAIN_SLACK

    def charge(self, cost: float, what: str) -> None:
        self.allowance -= cost
        if self.allowance < 0:
            raise BatchError(f"{what} is too large to read: plain msgpack values (not typed arrays) may "
                             f"cost about {PLAIN_SHARE:g}x the body plus {PLAIN_SLACK >> 20} MiB "
                             f"(docs/wire.md)", status=413)

    def plain(self, section: Section, what: str) -> Any:
        self.charge(PLAIN_COST * section.size, what)
        return self._unpack(section, ext_hook=_refuse_ext, **_PLAIN_LIMITS)

    def value(self, section: Section, what: str) -> Any:
        """A column: a typed array as a view of the body, or a plain value (charged)."""
        try:
            probe = msgpack.unpackb(self.view[section.start:section.end], ext_hook=_Ext, **_PROBE_LIMITS)
        except ValueError:
            return self.plain(section, what)  # a container or a string: plain
        except msgpack.UnpackException as error:
            raise invalid(error) from None
        if not isinstance(probe, _Ext):
            return probe
        if probe.code != EXT_ARRAY:
            raise BatchError(f"{what} is msgpack extension type {probe.code}; a typed array is type {EXT_ARRAY}")
        dtype = DTYPES.get(probe.tag)
        if dtype is None:
            raise BatchError(f"{what} is a typed array of dtype {probe.tag[:16]!r}; "
                             f"dtypes are {', '.join(DTYPES)}")
        count, extra = divmod(probe.length - TAG_BYTES, dtype.itemsize)
        if count < 0 or extra:
            raise BatchError(f"{what} holds {probe.length - TAG_BYTES} bytes, not a whole number of {dtype.name}")
        start = section.end - probe.length + TAG_BYTES  # the extension's data ends its section
        return np.frombuffer(self.view, dtype=dtype, count=count, offset=start)

    def names(self, section: Section) -> Any:
        """Tensor names, one at a time: a name that is a container or over 4,000 bytes is refused."""
        unpacker = msgpack.Unpacker(max_buffer_size=max(1, section.size),
                                    read_size=max(1, min(section.size, 4096)), **_NAME_LIMITS)
        unpacker.feed(self.view[section.start:section.end])
        try:
            count = unpacker.read_array_header()
        except ValueError:
            return self.plain(section, "field 'tensor_norms.names'")
        self.charge(NAME_COST * count + section.size, "field 'tensor_norms.names'")
        try:
            return [unpacker.unpack() for _ in range(count)]
        except ValueError:
            raise BatchError("field 'tensor_norms.names' must be a non-empty list of names") from None

    def _unpack(self, section: Section, **options) -> Any:
        try:
            return msgpack.unpackb(self.view[section.start:section.end], **options)
        except BatchError:
            raise
        except _UNPACK_ERRORS as error:
            raise invalid(error) from None


def _refuse_ext(code: int, data: bytes) -> None:
    raise BatchError(f"a msgpack extension (type {code}) is allowed only as a column's typed array")


def _batch(reader: Reader, section: Section) -> Batch:
    members = section.members
    if members is None:
        return parse_batch(reader.plain(section, "the batch"))  # not a map: named by type
    unknown = sorted(key for key in members if key not in BATCH_KEYS)
    if unknown:
        raise BatchError(f"unknown field '{unknown[0]}'")
    for required in REQUIRED_FIELDS:
        if required not in members:
            raise BatchError(f"missing required column '{required}'")
    obj: dict[str, Any] = {}
    for name, part in members.items():
        if name == "tensor_norms":
            obj[name] = _tensor_norms(reader, part)
        else:
            obj[name] = reader.value(part, f"column '{name}'")
    return parse_batch(obj)


def _tensor_norms(reader: Reader, section: Section) -> Any:
    members = section.members
    if members is None:
        return reader.plain(section, "field 'tensor_norms'")
    out: dict[str, Any] = {}
    for key, part in members.items():
        if key == "names":
            out[key] = reader.names(part)
        elif key == "norms":
            out[key] = reader.value(part, "field 'tensor_norms.norms'")
        else:
            out[key] = None  # refused by the schema ("an object with 'names' and 'norms'")
    return out


def load_batch(data: bytes | bytearray | memoryview) -> Batch:
    """An `application/msgpack` body of `POST /api/runs/{run}/steps` -> a validated Batch."""
    return _batch(Reader(data), skeleton(data, {"tensor_norms": {}}))


def load_message(data: bytes | bytearray | memoryview) -> tuple[Any, IngestMessage]:
    """A binary `/ws/ingest` frame -> (its seq, the validated message); a BatchError
    carries `seq` (None when the message has none or it could not be read)."""
    seq = None
    try:
        top = skeleton(data, {"batch": {"tensor_norms": {}}})
        reader = Reader(data)
        members = top.members
        if members is None:
            check_message_fields(reader.plain(top, "the message"))
        if "seq" in members and members["seq"].size <= SMALL_VALUE:
            seq = message_seq({"seq": reader.plain(members["seq"], "field 'seq'")})
        unknown = sorted(set(members) - MESSAGE_KEYS)
        if unknown:
            raise BatchError(f"unknown field '{unknown[0]}' in the message")
        kind = reader.plain(members["type"], "field 'type'") if "type" in members \
            and members["type"].size <= SMALL_VALUE else None
        if kind != "batch":
            raise BatchError(f"field 'type' must be 'batch', got {kind!r}")
        run = members.get("run")
        run = validate_run_name(reader.plain(run, "the run name") if run is not None and run.size <= 1024 else None)
        batch, part = None, members.get("batch")
        if part is not None and not (part.members is None and part.size <= SMALL_VALUE
                                     and reader.plain(part, "the batch") is None):  # null: no batch
            batch = _batch(reader, part)
        meta = _meta(reader, members.get("meta"))
        events = None
        if "events" in members:
            events = parse_events(reader.plain(members["events"], "field 'events'"))
        return seq, IngestMessage(seq, run, batch, meta, events)
    except BatchError as error:
        error.seq = seq
        raise


def _meta(reader: Reader, section: Section | None) -> dict | None:
    if section is None:
        return None
    if section.size > 4 * MAX_META_BYTES:
        raise BatchError(f"field 'meta' is {section.size} bytes as sent, more than {MAX_META_BYTES} "
                         f"bytes as JSON: too large to read")
    meta = reader.plain(section, "field 'meta'")
    if meta is not None and not isinstance(meta, dict):
        raise BatchError("field 'meta' must be an object")
    if meta is not None:
        check_json("meta", meta, MAX_META_BYTES)
    return meta


__all__ = ["DTYPES", "EXT_ARRAY", "MEDIA_TYPE", "TAG_BYTES", "load_batch", "load_message"]
