"""Values out: the wire's spelling of floats and booleans, series, CSV.

One spelling everywhere (registry.NONFINITE_SPELLING): NaN and +-Inf as
strings, a missing value as null (JSON) or an empty cell (CSV).
"""
from __future__ import annotations

import csv
import io
import math
from typing import Iterator

import numpy as np

from gradwatch.server.storage.registry import BOOL_FIELDS, COLUMNS, NONFINITE_SPELLING, VALUE_COLUMNS

NAN, INF, NINF = NONFINITE_SPELLING["nan"], NONFINITE_SPELLING["inf"], NONFINITE_SPELLING["-inf"]


def encode_floats(values: np.ndarray, missing: np.ndarray | None = None) -> list:
    """float64 values as JSON-ready items: NaN/Inf as the wire's strings, missing as null."""
    out = values.tolist()
    bad = np.flatnonzero(~np.isfinite(values))
    for index in bad.tolist():
        value = out[index]
        if missing is not None and missing[index]:
            out[index] = None
        elif value != value:
            out[index] = NAN
        else:
            out[index] = INF if value > 0 else NINF
    return out


def encode_bools(values: np.ndarray) -> list:
    """0.0/1.0 as false/true, NaN (missing) as null."""
    out = (values == 1.0).tolist()
    for index in np.flatnonzero(np.isnan(values)).tolist():
        out[index] = None
    return out


def encode_float(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    if value != value:
        return NAN
    return INF if value > 0 else NINF


def encode_series(steps: np.ndarray, values: dict[str, np.ndarray], missing: dict[str, np.ndarray | None],
                  fields: tuple[str, ...]) -> dict[str, list]:
    """Columnar JSON-ready series (the `series` answer and the live `points` data)."""
    out: dict[str, list] = {"step": steps.tolist()}
    for name in fields:
        if name == "step":
            continue
        if name in BOOL_FIELDS:
            out[name] = encode_bools(values[name])
        else:
            out[name] = encode_floats(values[name], missing[name])
    return out


def _cell(item) -> str:
    if item is None:
        return ""
    if item is True:
        return "true"
    if item is False:
        return "false"
    return repr(item) if isinstance(item, float) else str(item)


def csv_lines(parts, chunk: int = 10_000) -> Iterator[str]:
    """Every step of `parts` ((steps, values, missing) of every column, in step order, e.g.
    `Reader.iter_steps`) as CSV text, in pieces: the registry's columns, NaN/Infinity spelled
    as on the wire, missing values empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for steps, values, missing in parts:
        for begin in range(0, len(steps), chunk):
            stop = begin + chunk
            part = encode_series(steps[begin:stop], {k: v[begin:stop] for k, v in values.items()},
                                 {k: (m[begin:stop] if m is not None else None) for k, m in missing.items()},
                                 VALUE_COLUMNS)
            writer.writerows(map(_cell, row) for row in zip(*(part[name] for name in COLUMNS)))
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue()
