"""The wire format, validated: batches in, JSON shapes out.

This module is the authoritative version of `docs/wire.md`. Batches are
validated column by column with numpy (no per-row models): a 2,000-step batch
is checked in well under a millisecond. The Pydantic models below only
document the response shapes in OpenAPI; handlers build plain dicts.
"""
from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, Field

from gradwatch.server.storage.registry import (BOOL_FIELDS, COLUMNS, FLOAT_FIELDS, LIVE_FIELDS, NAN_BITS,
                                               NONFINITE_STRINGS, REQUIRED_FIELDS, STEP_EVENT_KINDS,
                                               VALUE_COLUMNS)
from gradwatch.server.storage.serialise import encode_bools, encode_float, encode_floats

__all__ = ["BOOL_FIELDS", "COLUMNS", "FLOAT_FIELDS", "LIVE_FIELDS", "NAN_BITS", "VALUE_COLUMNS",
           "encode_bools", "encode_float", "encode_floats", "Batch", "BatchError", "Column",
           "IngestMessage", "parse_batch", "parse_events", "parse_ingest_message", "validate_run_name"]

BATCH_KEYS = frozenset(COLUMNS) | {"tensor_norms"}
MESSAGE_KEYS = frozenset({"type", "seq", "run", "batch", "meta", "events"})
MAX_STEP = 2**53 - 1   # the largest step: every step is exact as a float64 (JSON numbers, numpy reads)
MAX_RUN_NAME = 200
MAX_JSON_DEPTH = 32          # nesting of `meta` and an event's `detail`
MAX_META_BYTES = 64 * 1024   # one message's `meta`, as JSON
MAX_DETAIL_BYTES = 16 * 1024  # one event's `detail`, as JSON
MAX_EVENTS = 10_000          # events in one message
NORM_FIELDS = ("pre_norm", "post_norm")  # norms: >= 0, or NaN/+Infinity (data), never negative


class BatchError(ValueError):
    """A batch that can never be accepted; the message names the field."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class Column:
    """One validated value column: float64 values, NaN where missing or NaN.

    `missing` marks nulls (None when there are none). Bool columns hold 0.0/1.0.
    """

    values: np.ndarray
    missing: np.ndarray | None = None
    raw: list | None = None   # the decoded JSON list, when it held only plain numbers/bools


@dataclass
class Batch:
    steps: np.ndarray                      # int64, unique, >= 0
    columns: dict[str, Column]             # only the columns sent
    tensor_names: list[str] | None = None
    tensor_norms: np.ndarray | None = None  # float32, (steps, names)

    def __len__(self) -> int:
        return len(self.steps)


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


def _as_list(name: str, values: Any) -> list:
    if not isinstance(values, list):
        raise BatchError(f"column '{name}' must be a list, got {type(values).__name__}")
    return values


def _bool_at(values: list, array: np.ndarray) -> int | None:
    """Index of the first JSON boolean in `values`, a list numpy read as numbers (`array`).

    `np.array([0.5, True])` is `[0.5, 1.0]`: a boolean hides as a 0 or a 1, so only
    those items need their type looked at (a vectorised test, ~5 us per 2,000 values).
    A column mostly of 0s and 1s (a `scale` of 1.0 while nothing clips) is scanned
    whole by type instead, which is cheaper than indexing it item by item.
    """
    hits = (array == 1) | (array == 0)
    count = int(np.count_nonzero(hits))
    if not count:
        return None
    if count > len(values) // 8:
        if bool not in map(type, values):
            return None
        return next(index for index, value in enumerate(values) if type(value) is bool)
    return next((index for index in np.flatnonzero(hits).tolist() if type(values[index]) is bool), None)


def _step_array(values: list) -> np.ndarray:
    """The steps as int64, or a 422 naming the first item that is not an integer."""
    try:
        array = np.array(values)
    except (ValueError, OverflowError, TypeError):
        array = np.array([], dtype=object)
    if len(values) and (array.dtype.kind not in "iu" or array.ndim != 1):
        bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, int)), None)
        raise BatchError(f"column 'step' must hold integers, got {bad!r}")
    return array.astype(np.int64) if len(values) else np.zeros(0, dtype=np.int64)


def _check_step_range(steps: np.ndarray) -> None:
    if len(steps) and (steps.min() < 0 or steps.max() > MAX_STEP):
        bad = int(steps.min()) if steps.min() < 0 else int(steps.max())
        raise BatchError(f"column 'step' must hold integers from 0 to 2**53 - 1, got {bad}")


def _step_bool_error(values: list, steps: np.ndarray, offset: int = 0) -> BatchError | None:
    """A boolean among the steps (it reads as 0 or 1), as the error to raise; None when none."""
    if len(steps) and steps.min() <= 1:
        index = _bool_at(values, steps)
        if index is not None:
            return BatchError(f"column 'step' must hold integers, got {values[index]!r} "
                              f"at index {index + offset}")
    return None


def _check_step_repeats(steps: np.ndarray) -> None:
    if len(steps) > 1 and not bool(np.all(steps[1:] > steps[:-1])):  # the usual batch is ascending
        ordered = np.sort(steps)
        repeats = np.flatnonzero(ordered[1:] == ordered[:-1])
        if len(repeats):
            raise BatchError(f"column 'step' repeats step {int(ordered[repeats[0]])} within the batch")


def _parse_steps(values: list) -> np.ndarray:
    steps = _step_array(values)
    _check_step_range(steps)
    error = _step_bool_error(values, steps)
    if error is not None:
        raise error
    _check_step_repeats(steps)
    return steps


def _parse_items(name: str, values: list, booleans: bool = False, offset: int = 0) -> Column:
    """Item by item, for a column numpy could not read as plain numbers (or booleans):
    nulls, the non-finite strings, or a bad item to name (`offset`: the index of
    `values[0]` in its column, when `values` is one piece of it)."""
    out = np.empty(len(values), dtype=np.float64)
    missing = np.zeros(len(values), dtype=bool)
    for index, value in enumerate(values):
        if value is None:
            out[index] = math.nan
            missing[index] = True
        elif booleans:
            if value is True or value is False or (type(value) is int and value in (0, 1)):
                out[index] = float(value)
            else:
                raise BatchError(f"column '{name}' must hold booleans, got {value!r} at index {index + offset}")
        elif isinstance(value, str):
            if value not in NONFINITE_STRINGS:
                raise BatchError(f"column '{name}' holds the string {value[:40]!r} at index {index + offset}; "
                                 f"strings allowed are 'NaN', 'Infinity', '-Infinity'")
            out[index] = NONFINITE_STRINGS[value]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                out[index] = float(value)
            except OverflowError:
                raise BatchError(f"column '{name}' holds a number too large at index {index + offset}") from None
        else:
            raise BatchError(f"column '{name}' must hold numbers, got {type(value).__name__} "
                             f"at index {index + offset}")
    return Column(out, missing if missing.any() else None)


def _refuse_null_pre_norm(name: str, column: Column) -> None:
    """`pre_norm` is the one required float: null is not a norm (checked after the whole
    column, so that a bad item anywhere in it is named first)."""
    if name == "pre_norm" and column.missing is not None:
        raise BatchError(f"column 'pre_norm' holds null at index {int(np.flatnonzero(column.missing)[0])}")


def _parse_float(name: str, values: list, offset: int = 0) -> Column:
    try:
        array = np.array(values)
    except (ValueError, OverflowError, TypeError):
        array = None
    if offset and array is not None and array.ndim == 1 and array.dtype.kind == "b" and len(values):
        # a later piece of a long column (parse.py), all booleans: named as in a mixed column
        raise BatchError(f"column '{name}' must hold numbers, got {values[0]!r} at index {offset}")
    if array is not None and array.ndim == 1 and array.dtype.kind in "fi":
        index = _bool_at(values, array)
        if index is not None:
            raise BatchError(f"column '{name}' must hold numbers, got {values[index]!r} at index {index + offset}")
        floats = array.astype(np.float64, copy=False)
        # `raw` is bound as sent: only where every int is the float it means (|x| <= 2**53), so
        # 2**60 + 1 in `time` is stored, and compared on a resend, as float(2**60 + 1).
        exact = array.dtype.kind == "f" and not bool(np.any(np.abs(floats) >= 2.0**53)) \
            or array.dtype.kind == "i" and (not len(array) or int(np.abs(array).max()) <= 2**53)
        return Column(floats, raw=values if exact else None)
    return _parse_items(name, values, offset=offset)


def _parse_bool(name: str, values: list, offset: int = 0) -> Column:
    try:
        array = np.array(values)
    except (ValueError, TypeError):
        array = None
    if array is not None and array.ndim == 1 and array.dtype.kind == "b":
        return Column(array.astype(np.float64), raw=values)
    return _parse_items(name, values, booleans=True, offset=offset)


def _parse_column(name: str, values: list, offset: int = 0) -> Column:
    """One value column (or one piece of it, `offset` items in), by its registry type."""
    return (_parse_bool if name in BOOL_FIELDS else _parse_float)(name, values, offset)


def _tensor_names(names: Any) -> list[str]:
    if (not isinstance(names, list) or not names
            or not all(isinstance(n, str) and 0 < len(n) <= 1000 for n in names)):
        raise BatchError("field 'tensor_norms.names' must be a non-empty list of names")
    if len(set(names)) != len(names):
        raise BatchError("field 'tensor_norms.names' repeats a name")
    return names


def _rows_error(n_steps: int, rows: Any) -> BatchError:
    got = len(rows) if isinstance(rows, list) else type(rows).__name__
    return BatchError(f"field 'tensor_norms.norms' must have one row per step ({n_steps}), got {got}")


def _parse_tensor_norms(value: Any, n_steps: int) -> tuple[list[str], np.ndarray]:
    if not isinstance(value, dict) or set(value) != {"names", "norms"}:
        raise BatchError("field 'tensor_norms' must be an object with 'names' and 'norms'")
    names = _tensor_names(value["names"])
    rows = value["norms"]
    if not isinstance(rows, list) or len(rows) != n_steps:
        raise _rows_error(n_steps, rows)
    return names, _norm_rows(rows, len(names))


def _norm_rows(rows: list, width: int, offset: int = 0) -> np.ndarray:
    """Rows of per-tensor norms as float32 (`offset`: the index of `rows[0]`, when a piece)."""
    try:
        norms = np.array(rows, dtype=np.float32) if rows else np.zeros((0, width), np.float32)
    except (ValueError, TypeError):
        norms = None
    if norms is None or norms.shape != (len(rows), width):
        norms = np.empty((len(rows), width), dtype=np.float32)
        for index, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != width:
                raise BatchError(f"field 'tensor_norms.norms' row {index + offset} must have {width} values")
            column = _parse_items("tensor_norms.norms", row)
            if column.missing is not None:
                raise BatchError(f"field 'tensor_norms.norms' row {index + offset} holds null")
            norms[index] = column.values
    else:
        _refuse_bool_norms(rows, norms, offset)
    return norms


def _refuse_bool_norms(rows: list[list], norms: np.ndarray, offset: int = 0) -> None:
    """`np.array(rows, dtype=float32)` reads a JSON boolean as 0.0/1.0: look at those cells."""
    hits = (norms == 1) | (norms == 0)
    count = int(np.count_nonzero(hits))
    if not count:
        return
    if count > hits.size // 8:
        cells = ((index, position) for index, row in enumerate(rows) if bool in map(type, row)
                 for position in range(len(row)))
    else:
        cells = map(tuple, np.argwhere(hits).tolist())
    for index, position in cells:
        if type(rows[index][position]) is bool:
            raise BatchError(f"field 'tensor_norms.norms' row {index + offset} must hold numbers, "
                             f"got {rows[index][position]!r} at index {position}")


def parse_batch(obj: Any) -> Batch:
    """Validate a columnar batch (a decoded JSON object); raises BatchError naming the field."""
    if not isinstance(obj, dict):
        raise BatchError(f"a batch must be a JSON object of columns, got {type(obj).__name__}")
    unknown = sorted(key for key in obj if key not in BATCH_KEYS)
    if unknown:
        raise BatchError(f"unknown field '{unknown[0]}'")
    for required in REQUIRED_FIELDS:
        if required not in obj:
            raise BatchError(f"missing required column '{required}'")
    steps = _parse_steps(_as_list("step", obj["step"]))
    columns: dict[str, Column] = {}
    for name in VALUE_COLUMNS:
        if name not in obj:
            continue
        values = _as_list(name, obj[name])
        if len(values) != len(steps):
            raise BatchError(f"column '{name}' has {len(values)} values, 'step' has {len(steps)}")
        columns[name] = _parse_column(name, values)
        _refuse_null_pre_norm(name, columns[name])
    for name in NORM_FIELDS:
        if name in columns:
            _refuse_negative(name, columns[name].values)
    batch = Batch(steps=steps, columns=columns)
    if "tensor_norms" in obj and obj["tensor_norms"] is not None:
        batch.tensor_names, batch.tensor_norms = _parse_tensor_norms(obj["tensor_norms"], len(steps))
        _refuse_negative("tensor_norms.norms", batch.tensor_norms)
    return batch


def _refuse_negative(name: str, values: np.ndarray) -> None:
    """A norm is never negative (-Infinity included); NaN and +Infinity are data."""
    negative = values < 0
    if negative.any():
        index = tuple(int(i) for i in np.argwhere(negative)[0])
        where = index[0] if len(index) == 1 else f"{index[0]}, {index[1]}"
        raise BatchError(f"column '{name}' holds the negative norm {float(values[index])!r} at index "
                         f"{where}; a norm is >= 0, NaN or Infinity")


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


@dataclass
class IngestMessage:
    """One validated `/ws/ingest` message."""

    seq: Any
    run: str
    batch: Batch | None
    meta: dict | None
    events: list[dict] | None


def message_seq(message: Any) -> Any:
    """The message's `seq` to echo in the reply: an integer or a short string, else None
    (an echoed seq nested 300 deep could not even be written back)."""
    seq = message.get("seq") if isinstance(message, dict) else None
    if (type(seq) is int and -2**63 <= seq < 2**64) or (isinstance(seq, str) and len(seq) <= 200):
        return seq
    return None


def _finite_float(name: str, value: int | float) -> float:
    """A JSON number as the float it means; 422 when it has none (2**1024) or is not finite."""
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


def parse_ingest_message(message: Any) -> IngestMessage:
    """Validate a decoded `/ws/ingest` message; raises BatchError naming the field."""
    if not isinstance(message, dict):
        raise BatchError("a message must be a JSON object")
    unknown = sorted(set(message) - MESSAGE_KEYS)
    if unknown:
        raise BatchError(f"unknown field '{unknown[0]}' in the message")
    if message.get("type") != "batch":
        raise BatchError(f"field 'type' must be 'batch', got {message.get('type')!r}")
    run = validate_run_name(message.get("run"))
    batch = parse_batch(message["batch"]) if message.get("batch") is not None else None
    meta = message.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise BatchError("field 'meta' must be an object")
    if meta is not None:
        check_json("meta", meta, MAX_META_BYTES)
    return IngestMessage(message.get("seq"), run, batch, meta, parse_events(message.get("events")))


# ----- response shapes (documentation in OpenAPI; handlers return plain JSON) -----

JsonFloat = float | str | None


class IngestAnswer(BaseModel):
    accepted: int
    duplicates: int
    conflicts: int


class RunOut(BaseModel):
    name: str
    steps: int
    first_step: int | None
    last_step: int | None
    created: str
    updated: str
    clip_rate: float | None
    clips: int
    spikes: int
    nonfinite: int
    meta: dict[str, Any]


class EventOut(BaseModel):
    step: int | None
    kind: str
    value: JsonFloat
    threshold: JsonFloat
    message: str
    time: JsonFloat
    detail: dict[str, Any] | None = None
    threshold_kind: Literal["clip", "detector", "alert"] | None = None  # what `threshold` is


class StatsOut(BaseModel):
    count: int
    finite: int
    percentiles: dict[str, float | None]
    clip_rate: float | None
    nonfinite: int
    first_step: int | None
    last_step: int | None
    mean: float | None
    std: float | None
    min: float | None
    max: float | None


class Candidate(BaseModel):
    label: str
    threshold: float
    clip_rate: float | None = Field(description="fraction of the clean window's norms above it")
    clip_rate_raw: float | None = Field(None, description="fraction of the rate window's finite norms above it")
    over: str = "clean window"
    over_raw: str | None = Field(None, description="the steps `clip_rate_raw` is over (the rate window)")


class Drift(BaseModel):
    start_median: float | None
    recent_median: float | None
    window_median: float | None
    change: float | None
    warning: str | None


class StepSpan(BaseModel):
    """Which steps an answer covers."""
    start: int | None
    end: int | None
    steps: int


class RecommendationWindow(StepSpan):
    clean_steps: int
    clean_start: int | None


class RateWindow(StepSpan):
    """The steps every `*_raw` clip rate is over: from `window.start`, or from `clean_start`
    after a level shift; `finite` of them count."""
    finite: int
    after_level_shift: bool


class CleanWindow(BaseModel):
    start: int | None
    end: int | None
    steps: int
    excluded: int


class RecommendationOut(BaseModel):
    """The recommendation (docs/wire.md): `threshold` null with a `reason` when there are too
    few clean steps; percentiles and candidates are over the clean window."""
    threshold: float | None
    reason: str | None
    method: Literal["robust", "target_clip_rate"]
    k: float
    target_clip_rate: float | None
    median: float | None
    ratio_to_median: float | None
    clip_rate_clean: float | None
    clip_rate_raw: float | None
    current_threshold: float | None
    current_clip_rate_clean: float | None
    current_clip_rate_raw: float | None
    clip_rate_at_1_clean: float | None
    clip_rate_at_1_raw: float | None
    spikes_left_out: int
    nonfinite_left_out: int
    transition_left_out: int
    level_shift: bool
    level_shift_steps: list[int]
    rationale: str
    window: RecommendationWindow
    rate_window: RateWindow | None = None
    percentiles_over: str
    percentiles: dict[str, float | None]
    candidates: list[Candidate]
    count: int
    clean_window: CleanWindow
    drift: Drift
    warnings: list[str]


class WhatIfOut(BaseModel):
    """`clipped` of the `count` finite norms in `window` lie above `threshold`; `over` says which
    steps: "window" (the recommendation's rate window) or "run" (the whole run)."""
    threshold: float
    count: int
    clipped: int
    clip_rate: float | None
    window: StepSpan
    over: Literal["window", "run", "last"] = "window"


class HistogramOut(BaseModel):
    edges: list[float]
    counts: list[int]
    log: bool
    count: int
    window: StepSpan


class TensorsOut(BaseModel):
    names: list[str]
    step: list[int]
    norms: list[list[JsonFloat]]


class DeletedOut(BaseModel):
    deleted: str
    steps: int
    tensor_norms: int
    events: int


class HealthOut(BaseModel):
    status: str
    database: str
    schema_version: int


# A series: the columns asked for, equal-length lists (floats may be "NaN"/"Infinity"/"-Infinity").
SeriesOut = dict[str, list[int | float | str | bool | None]]
