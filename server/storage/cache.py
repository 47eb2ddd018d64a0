"""The run cache: runs' step columns as numpy arrays, bounded in bytes, refreshed by chunk.

Reads of a run's whole columns (stats, recommendation, what-if, histogram,
CSV, derived events) go through `RunCache.get`. An entry remembers the run
version it was read at; when the run's version moves, only the chunks written
after it are read (`chunks.version > cached`: an append rewrites the tail
chunk, a late step its own chunk) and spliced into the arrays in place of the
old copies of those chunks. The entries together hold at most `max_bytes`
(`serve --cache-mb`); the least recently used go first, and an answer larger
than the whole budget is returned without being kept.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from gradwatch.server.chunks import CHUNK
from gradwatch.server.storage.chunk_rows import arrays_of
from gradwatch.server.storage.registry import VALUE_COLUMNS, value_columns


@dataclass
class RunArrays:
    """A run's steps as numpy arrays (float64; bools as 0/1; NaN where NaN or missing)."""

    count: int
    steps: np.ndarray
    values: dict[str, np.ndarray]
    missing: dict[str, np.ndarray | None]
    version: int = -1

    @property
    def last_step(self) -> int:
        return int(self.steps[-1]) if len(self.steps) else -1

    def nbytes(self) -> int:
        total = self.steps.nbytes + sum(v.nbytes for v in self.values.values())
        total += sum(m.nbytes for m in self.missing.values() if m is not None)
        return total


def splice(old: RunArrays, steps: np.ndarray, values: dict[str, np.ndarray],
           missing: dict[str, np.ndarray | None], changed: list[int], version: int) -> RunArrays:
    """`old` with the rows of the `changed` chunks (sorted ids) replaced by the new rows
    (`steps`.. hold exactly those chunks' rows, ascending)."""
    old_ids = old.steps // CHUNK
    new_ids = steps // CHUNK
    keep_parts: list[tuple[str, int, int]] = []   # ("old"|"new", begin, end)
    position = 0
    for chunk_id in changed:
        a = int(np.searchsorted(old_ids, chunk_id, side="left"))
        b = int(np.searchsorted(old_ids, chunk_id, side="right"))
        c = int(np.searchsorted(new_ids, chunk_id, side="left"))
        d = int(np.searchsorted(new_ids, chunk_id, side="right"))
        keep_parts.append(("old", position, a))
        keep_parts.append(("new", c, d))
        position = b
    keep_parts.append(("old", position, len(old.steps)))

    def build(old_array: np.ndarray, new_array: np.ndarray) -> np.ndarray:
        return np.concatenate([(old_array if side == "old" else new_array)[a:b] for side, a, b in keep_parts])

    merged_missing: dict[str, np.ndarray | None] = {}
    for name in old.values:
        a, b = old.missing[name], missing[name]
        if a is None and b is None:
            merged_missing[name] = None
        else:
            merged_missing[name] = build(a if a is not None else np.zeros(len(old.steps), bool),
                                         b if b is not None else np.zeros(len(steps), bool))
    merged_steps = build(old.steps, steps)
    return RunArrays(count=len(merged_steps), steps=merged_steps,
                     values={name: build(old.values[name], values[name]) for name in old.values},
                     missing=merged_missing, version=version)


class RunCache:
    """Per-process cache of runs' columns as arrays, at most `max_bytes` in all."""

    def __init__(self, reader, max_bytes: int = 128 << 20):
        self.reader = reader
        self.max_bytes = max_bytes
        self._runs: OrderedDict[tuple[int, float], RunArrays] = OrderedDict()
        self._locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes() for entry in self._runs.values())

    def get(self, run_id: int, fields: tuple[str, ...] | set[str] = VALUE_COLUMNS) -> RunArrays:
        wanted = {name for name in fields if name != "step"}
        version, created = self.reader.run_version(run_id)
        key = (run_id, created)  # a deleted run's id may come back (SQLite): `created` tells them apart
        with self._lock:
            run_lock = self._locks.setdefault(run_id, threading.Lock())
            current = self._runs.get(key)
        if current is not None and current.version == version and wanted <= current.values.keys():
            with self._lock:
                if key in self._runs:
                    self._runs.move_to_end(key)
            return current
        with run_lock:
            with self._lock:
                current = self._runs.get(key)
            if current is not None and current.version >= version and wanted <= current.values.keys():
                return current
            if current is not None and wanted <= current.values.keys():
                columns = value_columns(current.values)
                now, chunks = self.reader.load_chunks(run_id, columns, since_version=current.version)
                steps, values, missing = arrays_of(chunks.values(), columns)
                fresh = splice(current, steps, values, missing, sorted(chunks), now)
            else:
                columns = value_columns(wanted | (set(current.values) if current is not None else set()))
                now, chunks = self.reader.load_chunks(run_id, columns)
                steps, values, missing = arrays_of(chunks.values(), columns)
                fresh = RunArrays(count=len(steps), steps=steps, values=values, missing=missing, version=now)
            self._keep(key, fresh)
        return fresh

    def _keep(self, key: tuple[int, float], entry: RunArrays) -> None:
        with self._lock:
            self._runs.pop(key, None)
            size = entry.nbytes()
            if size > self.max_bytes:
                return
            self._runs[key] = entry
            total = sum(item.nbytes() for item in self._runs.values())
            while total > self.max_bytes and len(self._runs) > 1:
                _, dropped = self._runs.popitem(last=False)
                total -= dropped.nbytes()

    def forget(self, run_id: int) -> None:
        """Drop a run's arrays (the run was deleted)."""
        with self._lock:
            for key in [key for key in self._runs if key[0] == run_id]:
                del self._runs[key]
            self._locks.pop(run_id, None)
