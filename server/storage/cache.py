"""The run cache: runs' step columns as numpy arrays, bounded in bytes, refreshed by chunk.

Reads of a run's whole columns (stats, recommendation, what-if, histogram,
CSV, derived events) go through `RunCache.get`. An entry remembers the run
version it was read at; when the run's version moves, only the chunks written
after it are read (`chunks.version > cached`: an append writes to the newest
chunk, a late step to its own chunk) and spliced into the arrays in place of the
old copies of those chunks. The entries together hold at most `max_bytes`
(`serve --cache-mb`); the least recently used go first, and an answer larger
than the whole budget is returned without being kept.

The same budget holds each run's `OverviewEntry`: what the downsampled overview
decoded (whole-run summaries per width, kept rows, the cut edges' chunks), so a
second overview of a run (the dashboard's zoom-out and refetch) reads no blob
again; when the run's version moves, the summaries of the chunks written since
are read and spliced in (`reads.Reader.overview`).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from gradwatch.server.storage.chunks import CHUNK, Chunk
from gradwatch.server.storage.chunks.summaries import Summary, concat
from gradwatch.server.storage.chunk_rows import arrays_of
from gradwatch.server.storage.registry import VALUE_COLUMNS, value_columns

EDGE_CHUNKS = 8   # decoded chunks an overview entry keeps (the ranges' cut edges: the run's newest chunk)


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


def summary_bytes(summary: Summary) -> int:
    if summary.matrices is not None:
        return summary.matrices[1].nbytes + summary.matrices[2].nbytes
    total = sum(getattr(summary, f).nbytes for f in ("start", "rows", "first", "last"))
    for stats in (*summary.nums.values(), *summary.flags.values()):
        total += sum(array.nbytes for array in vars(stats).values())
    for values, ok in (*summary.at_min.values(), *summary.at_max.values()):
        total += values.nbytes + ok.nbytes
    return total


@dataclass
class OverviewEntry:
    """What the overview of one run decoded, at one run version: whole-run summaries per width
    (read once, then sliced to any range), each chunk's kept rows (every registry column), and
    a few decoded chunks (keyed by chunk id and columns). Immutable once another version is
    made from it (`refreshed`); filled in place only with data of its own version."""

    version: int
    levels: dict[int, Summary] = field(default_factory=dict)
    kept: dict[int, Chunk] = field(default_factory=dict)
    chunks: OrderedDict = field(default_factory=OrderedDict)   # (chunk id, columns) -> Chunk

    def nbytes(self) -> int:
        total = sum(summary_bytes(level) for level in list(self.levels.values()))
        total += sum(chunk.nbytes() for chunk in list(self.kept.values()))
        return total + sum(chunk.nbytes() for chunk in list(self.chunks.values()))

    def keep_chunk(self, chunk_id: int, columns: tuple[str, ...], chunk: Chunk) -> None:
        self.chunks[(chunk_id, columns)] = chunk
        while len(self.chunks) > EDGE_CHUNKS:
            self.chunks.popitem(last=False)

    def refreshed(self, version: int, changed: list[int], parts: dict[int, Summary]) -> "OverviewEntry":
        """This entry at `version`, where the chunks `changed` (sorted ids) were written since:
        their entries in each level replaced by `parts[width]` (those chunks' summaries at that
        width; a level without one is dropped), their kept rows and decoded copies dropped."""
        gone = set(changed)
        fresh = OverviewEntry(version)
        for width, level in self.levels.items():
            part = parts.get(width)
            if part is not None:
                fresh.levels[width] = splice_summary(level, part, changed)
        fresh.kept = {chunk_id: rows for chunk_id, rows in self.kept.items() if chunk_id not in gone}
        fresh.chunks = OrderedDict((key, chunk) for key, chunk in self.chunks.items() if key[0] not in gone)
        return fresh


def splice_summary(old: Summary, part: Summary, changed: list[int]) -> Summary:
    """`old` with the entries of the chunks `changed` replaced by `part`'s (ascending starts)."""
    kept = np.flatnonzero(~np.isin(old.start // CHUNK, np.asarray(changed, np.int64)))
    if not len(part):
        return old.take(kept)
    merged = concat([old.take(kept), part]) if len(kept) else part
    starts = merged.start
    if len(starts) > 1 and not np.all(starts[1:] > starts[:-1]):
        merged = merged.take(np.argsort(starts, kind="stable"))
    return merged


class RunCache:
    """Per-process cache of runs' columns as arrays, at most `max_bytes` in all."""

    def __init__(self, reader, max_bytes: int = 128 << 20):
        self.reader = reader
        self.max_bytes = max_bytes
        self._runs: OrderedDict[tuple, RunArrays | OverviewEntry] = OrderedDict()  # arrays: (id, created)
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

    def _keep(self, key: tuple, entry: RunArrays | OverviewEntry) -> None:
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

    def overview_entry(self, run_id: int, created: float) -> OverviewEntry | None:
        """The overview entry of the run (any version; the caller compares), None when not held."""
        with self._lock:
            entry = self._runs.get((run_id, created, "overview"))
            if entry is not None:
                self._runs.move_to_end((run_id, created, "overview"))
        return entry

    def keep_overview(self, run_id: int, created: float, entry: OverviewEntry) -> None:
        """Hold `entry` (after a read filled it), unless a newer version is held already; counted
        in `max_bytes` with the arrays, least recently used first out."""
        key = (run_id, created, "overview")
        with self._lock:
            held = self._runs.get(key)
            if held is not None and held.version > entry.version:
                return
        self._keep(key, entry)

    def forget(self, run_id: int) -> None:
        """Drop a run's arrays (the run was deleted)."""
        with self._lock:
            for key in [key for key in self._runs if key[0] == run_id]:
                del self._runs[key]
            self._locks.pop(run_id, None)
