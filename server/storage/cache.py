"""The run cache: a run's step columns as numpy arrays, refreshed by appending.

Reads of a run's columns (stats, series, CSV) go through `RunCache`: arrays of
the run's steps, refreshed by reading only the rows past the cached last step
when the run's row count says that is all that changed. `forget(run_id)` drops
a run (after a delete).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from gradwatch.server.storage.registry import FLOAT_FIELDS, NAN_BITS, VALUE_COLUMNS, value_columns


@dataclass
class RunArrays:
    """A run's steps as numpy arrays (float64; bools as 0/1; NaN where NaN or missing)."""

    count: int
    steps: np.ndarray
    values: dict[str, np.ndarray]
    missing: dict[str, np.ndarray | None]

    _ordered: np.ndarray | None = None

    def ordered_pre_norm(self) -> np.ndarray:
        """The run's finite pre-clip norms, sorted; computed once per cached version."""
        if self._ordered is None:
            self._ordered = np.sort(self.values["pre_norm"][np.isfinite(self.values["pre_norm"])])
        return self._ordered

    @property
    def last_step(self) -> int:
        return int(self.steps[-1]) if len(self.steps) else -1



def arrays_from_rows(rows: list[tuple], columns: tuple[str, ...] = VALUE_COLUMNS
                     ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray | None]]:
    """Rows of (step, *columns, nan_mask) as arrays: float64, NaN where NaN or NULL,
    bools as 0/1/NaN, and per float column a mask of the missing (NULL, not NaN) values."""
    width = len(columns) + 2
    table = np.array(rows, dtype=np.float64).reshape(len(rows), width) if rows else np.zeros((0, width))
    steps = table[:, 0].astype(np.int64)
    nan_mask = table[:, -1].astype(np.int64)
    values: dict[str, np.ndarray] = {}
    missing: dict[str, np.ndarray | None] = {}
    for position, name in enumerate(columns, start=1):
        column = np.ascontiguousarray(table[:, position])
        nulls = np.isnan(column)
        if name in FLOAT_FIELDS and nulls.any():
            is_nan = (nan_mask & NAN_BITS[name]) != 0
            absent = nulls & ~is_nan
            missing[name] = absent if absent.any() else None
        else:
            missing[name] = None if name in FLOAT_FIELDS or not nulls.any() else nulls
        values[name] = column
    return steps, values, missing


class RunCache:
    """Per-process cache of runs' columns as arrays, keyed by the run's stored row count.

    Rows are never deleted or overwritten, so an unchanged count means
    unchanged rows; a larger count whose new rows all lie past the cached last
    step is an append (only those rows are read); anything else reloads.
    Columns are read when first asked for (a stats request reads three of the
    twelve), each checked to line up with the cached steps.
    """

    def __init__(self, store, max_runs: int = 4):
        self.store = store
        self.max_runs = max_runs
        self._runs: OrderedDict[tuple[int, float], RunArrays] = OrderedDict()
        self._locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, run_id: int, fields: tuple[str, ...] | set[str] = VALUE_COLUMNS) -> RunArrays:
        wanted = {name for name in fields if name != "step"}
        count, _, created = self.store.run_counters(run_id)
        key = (run_id, created)  # a deleted run's id may come back (SQLite): `created` tells them apart
        with self._lock:
            run_lock = self._locks.setdefault(run_id, threading.Lock())
            current = self._runs.get(key)
        if current is not None and current.count == count and wanted <= current.values.keys():
            return current
        with run_lock:
            current = self._runs.get(key)
            if current is not None and current.count >= count and wanted <= current.values.keys():
                return current
            fresh = self._refresh(run_id, current, wanted) if current is not None else None
            if fresh is None:
                columns = _ordered_columns(wanted | (set(current.values) if current is not None else set()))
                _, (steps, values, missing) = self.store.fetch_steps_counted(run_id, columns)
                fresh = RunArrays(count=len(steps), steps=steps, values=values, missing=missing)
            with self._lock:
                self._runs[key] = fresh
                self._runs.move_to_end(key)
                while len(self._runs) > self.max_runs:
                    self._runs.popitem(last=False)
        return fresh

    def _refresh(self, run_id: int, current: RunArrays, wanted: set[str]) -> RunArrays | None:
        """Append new rows and add columns to `current`; None when only a reload will do."""
        loaded = _ordered_columns(set(current.values))
        total, (steps, values, missing) = self.store.fetch_steps_counted(run_id, loaded, after=current.last_step)
        if current.count + len(steps) != total:
            return None
        merged = _concat(current, steps, values, missing) if len(steps) else current
        extra = _ordered_columns(wanted - set(merged.values))
        if extra:
            _, (steps, values, missing) = self.store.fetch_steps_counted(run_id, extra, upto=merged.last_step)
            if not np.array_equal(steps, merged.steps):
                return None
            merged = RunArrays(count=merged.count, steps=merged.steps, values={**merged.values, **values},
                               missing={**merged.missing, **missing})
        return merged



    def forget(self, run_id: int) -> None:
        """Drop a run's arrays (the run was deleted)."""
        with self._lock:
            for key in [key for key in self._runs if key[0] == run_id]:
                del self._runs[key]
            self._locks.pop(run_id, None)


def _ordered_columns(names: set[str]) -> tuple[str, ...]:
    return value_columns(names)


def _concat(old: RunArrays, steps: np.ndarray, values: dict[str, np.ndarray],
            missing: dict[str, np.ndarray | None]) -> RunArrays:
    merged_missing: dict[str, np.ndarray | None] = {}
    for name in old.values:
        a, b = old.missing[name], missing[name]
        if a is None and b is None:
            merged_missing[name] = None
        else:
            merged_missing[name] = np.concatenate([
                a if a is not None else np.zeros(len(old.steps), dtype=bool),
                b if b is not None else np.zeros(len(steps), dtype=bool)])
    return RunArrays(count=len(old.steps) + len(steps), steps=np.concatenate([old.steps, steps]),
                     values={name: np.concatenate([old.values[name], values[name]]) for name in old.values},
                     missing=merged_missing)

