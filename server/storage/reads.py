"""Reads: runs, a run's chunks as arrays, the overview, events (stored ones merged with clips),
per-tensor norms.

Reads that take more than one statement run in one snapshot (`snapshot()`: a
read transaction in SQLite, REPEATABLE READ in PostgreSQL), so a batch that
commits meanwhile is seen whole or not at all.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import orjson
from sqlalchemy import Engine

from gradwatch.server.storage.chunks import BLOCK, CHUNK, Chunk, Series, combine, heatmap, overview
from gradwatch.server.storage.chunks.summaries import Summary
from gradwatch.server.storage.cache import EDGE_CHUNKS, OverviewEntry, RunCache
from gradwatch.server.storage.chunk_rows import KEPT_FLAGS, KEY, SPEC, ChunkRows, arrays_of
from gradwatch.server.storage.engine import Database
from gradwatch.server.storage.registry import VALUE_COLUMNS
from gradwatch.server.storage.serialise import encode_float

LAST_CHUNK = 2**62 // CHUNK
REFRESH_CHUNKS = 64   # chunks written since a held overview entry: more, and it is read again
CLIP_COLUMNS = ("pre_norm", "threshold", "clipped", "time")


class UnknownRun(LookupError):
    pass


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp % 1 * 1000):03d}Z"



class Reader(Database):
    """The read path of one server process."""

    def __init__(self, engine: Engine, run_ids: dict[str, int]):
        super().__init__(engine)
        self._run_ids = run_ids
        self.rows = ChunkRows(self.sql)

    def run_id(self, name: str) -> int:
        """The run's id, read each time (one indexed row): another process may have deleted
        the run, and SQLite may give a new run of the same name the same id."""
        rows = self.read("SELECT id FROM runs WHERE name = ?", (name,))
        if not rows:
            raise UnknownRun(name)
        return rows[0][0]

    def list_runs(self, meta: bool = True) -> list[dict]:
        """Every run with its counters; `clip_rate` as `/stats` has it for the whole run:
        clipped steps over the steps that carry a clipped flag, None when none does.

        `meta` is the stored JSON as an `orjson.Fragment` (serialised as it is, never parsed
        here: a list of many runs with large metas cost a parse of each; `meta_of` gives one
        run's as a dict); `meta=False` leaves it out and does not read it."""
        # meta apart and unsorted: SQLite's sorter copies every sorted row whole (an 18 MiB
        # meta made the sorted read ~10x slower than reading it)
        with self.snapshot() as cursor:
            cursor.execute("SELECT name, steps, first_step, last_step, created, updated, clips, clip_flags, "
                           "spikes, nonfinite FROM runs ORDER BY updated DESC")
            rows = cursor.fetchall()
            if meta:
                cursor.execute("SELECT name, meta FROM runs")
                metas = dict(cursor.fetchall())
        out = []
        for name, steps, first, last, created, updated, clips, flags, spikes, nonfinite in rows:
            item = {"name": name, "steps": steps, "first_step": first, "last_step": last,
                    "created": iso(created), "updated": iso(updated),
                    "clip_rate": clips / flags if flags else None, "clips": clips,
                    "spikes": spikes, "nonfinite": nonfinite}
            if meta:
                item["meta"] = _meta_fragment(metas.get(name))
            out.append(item)
        return out

    def meta_of(self, run_id: int) -> dict:
        """One run's stored meta as a dict."""
        rows = self.read("SELECT meta FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise UnknownRun(run_id)
        return json.loads(rows[0][0] or "{}")

    def run_version(self, run_id: int) -> tuple[int, float]:
        """(version, when created); UnknownRun(run_id) once it is deleted."""
        rows = self.read("SELECT version, created FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise UnknownRun(run_id)
        return rows[0][0], rows[0][1]

    def run_size(self, run_id: int) -> int:
        """How many steps the run holds."""
        rows = self.read("SELECT steps FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise UnknownRun(run_id)
        return int(rows[0][0])

    def step_range(self, run_id: int) -> tuple[int | None, int | None]:
        """The run's first and last stored step (None, None before any)."""
        rows = self.read("SELECT first_step, last_step FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise UnknownRun(run_id)
        return rows[0][0], rows[0][1]

    @contextmanager
    def snapshot(self) -> Iterator:
        """A cursor whose statements all see one committed state of the database."""
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            if self.is_sqlite:
                cursor.execute("BEGIN")
            else:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            try:
                yield cursor
            finally:
                if self.is_sqlite:
                    cursor.execute("COMMIT")
                else:
                    raw.rollback()
                cursor.close()
        finally:
            raw.close()

    def load_chunks(self, run_id: int, columns: tuple[str, ...], since_version: int | None = None
                    ) -> tuple[int, dict[int, Chunk]]:
        """(the run's version, its chunks with `columns`), only those written after
        `since_version` when given; one snapshot, so the version and the chunks agree."""
        with self.snapshot() as cursor:
            cursor.execute(self.sql("SELECT version FROM runs WHERE id = ?"), (run_id,))
            row = cursor.fetchone()
            if row is None:
                raise UnknownRun(run_id)
            chunks = self.rows.load_range(cursor, run_id, 0, LAST_CHUNK, columns, since_version)
        return row[0], chunks

    def fetch_steps(self, run_id: int, after: int = -1, lo: int | None = None, hi: int | None = None,
                    newest: int | None = None
                    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray | None]]:
        """Rows of a run with step > after (or in [lo, hi]) as arrays, ordered by step; with
        `newest`, at least the newest that many of them (only the chunks holding those are read)."""
        if lo is None:
            lo, hi = after + 1, 2**62
        with self.snapshot() as cursor:
            first = lo // CHUNK
            if newest is not None:
                cursor.execute(self.sql("SELECT chunk_id, n FROM chunks WHERE run_id = ? AND chunk_id BETWEEN ? AND ? "
                                        "ORDER BY chunk_id DESC"), (run_id, first, hi // CHUNK))
                held = 0
                for chunk_id, n in cursor.fetchall():
                    first, held = chunk_id, held + n
                    if held >= newest:
                        break
            chunks = self.rows.load_range(cursor, run_id, first, hi // CHUNK, VALUE_COLUMNS)
        steps, values, missing = arrays_of(chunks.values(), VALUE_COLUMNS)
        inside = (steps >= lo) & (steps <= hi)
        if inside.all():
            return steps, values, missing
        return steps[inside], {n: v[inside] for n, v in values.items()}, \
            {n: (m[inside] if m is not None else None) for n, m in missing.items()}

    def iter_steps(self, run_id: int, chunks_per_read: int = 16) -> Iterator[tuple]:
        """Every row of a run, every column, as (steps, values, missing) parts of at most
        `chunks_per_read` chunks, all from one snapshot: a CSV export of a long run never
        holds the whole run in memory."""
        with self.snapshot() as cursor:
            cursor.execute(self.sql("SELECT chunk_id FROM chunks WHERE run_id = ? ORDER BY chunk_id"), (run_id,))
            ids = [row[0] for row in cursor.fetchall()]
            for begin in range(0, len(ids), chunks_per_read):
                group = ids[begin:begin + chunks_per_read]
                chunks = self.rows.load_range(cursor, run_id, group[0], group[-1], VALUE_COLUMNS)
                yield arrays_of(chunks.values(), VALUE_COLUMNS)

    def overview(self, run_id: int, start: int | None, end: int | None, points: int,
                 fields: tuple[str, ...], cache: RunCache | None = None) -> Series:
        """The downsampled series of steps [start, end] (`server/storage/chunks/downsample.py`): from the
        summaries, decoding raw chunks only at the range's edges and where spikes or non-finite
        steps are to be kept.

        With `cache`, what was decoded is kept in the run's `OverviewEntry` (within the cache's
        byte budget) and read from there next time: the whole-run summaries of a width once an
        overview of the whole run asked for them (sliced for any range after), kept rows, the
        edges' chunks. An entry of an older version is brought up to the snapshot's version
        by reading the summaries of the chunks written since (`chunks.version`), in the same
        snapshot; a newer one is not used."""
        first, last = self.step_range(run_id)
        lo = first if start is None or first is not None and start < first else start
        hi = last if end is None or last is not None and end > last else end
        if first is None or lo > hi:
            empty = np.zeros(0)
            return Series(np.zeros(0, np.int64), {n: empty for n in fields}, {n: None for n in fields}, 0)
        with self.snapshot() as cursor:
            source = _Source(self.rows, cursor, run_id)
            if cache is None:
                return overview(source, SPEC, lo, hi, points, fields, key=KEY)
            cursor.execute(self.sql("SELECT version, created, first_step, last_step FROM runs WHERE id = ?"),
                           (run_id,))
            row = cursor.fetchone()
            if row is None:
                raise UnknownRun(run_id)
            version, created, run_first, run_last = row
            entry = self._current_entry(cursor, run_id, cache.overview_entry(run_id, created), version)
            if entry is None:
                return overview(source, SPEC, lo, hi, points, fields, key=KEY)
            cached = _CachedSource(source, entry, run_first // CHUNK, run_last // CHUNK)
            found = overview(cached, SPEC, lo, hi, points, fields, key=KEY)
        cache.keep_overview(run_id, created, entry)
        return found

    def _current_entry(self, cursor, run_id: int, entry: OverviewEntry | None, version: int
                       ) -> OverviewEntry | None:
        """`entry` at the snapshot's `version`: as it is, refreshed by the chunks written since,
        a new empty one (none held, or too much changed), or None (it is newer than the snapshot)."""
        if entry is None:
            return OverviewEntry(version)
        if entry.version == version:
            return entry
        if entry.version > version:
            return None
        cursor.execute(self.sql("SELECT chunk_id FROM chunks WHERE run_id = ? AND version > ? ORDER BY chunk_id"),
                       (run_id, entry.version))
        changed = [row[0] for row in cursor.fetchall()]
        if len(changed) > REFRESH_CHUNKS:
            return OverviewEntry(version)
        parts: dict[int, Summary] = {}
        if changed and entry.levels:
            block = self.rows.summaries_of(cursor, run_id, changed)
            try:
                parts = {width: block if width == BLOCK else combine(block, width) for width in entry.levels}
                return entry.refreshed(version, changed, parts)
            except (KeyError, ValueError):   # a layout the held levels do not share: read them again
                return OverviewEntry(version)
        return entry.refreshed(version, changed, parts)

    def events(self, run_id: int, kind: str | None, limit: int) -> list[dict]:
        """A run's events, newest first (by step, then by when stored), at most `limit`.

        The stored events (spike, nonfinite, conflict, drop, and whatever an agent
        sent) merged with the clip events, which are read from the clipped steps
        (value: the pre-clip norm; threshold and time: the step's) through the
        partial index of clipped steps, so the newest are found at once however
        sparse the clips. Within a step a clip event comes after the stored ones,
        where it was when ingest stored it first. Events without a step sort as
        the database sorts NULL (last in SQLite, first in PostgreSQL).
        """
        columns = "SELECT step, kind, value, threshold, nan_mask, message, detail, time FROM events"
        if kind:
            rows = self.read(f"{columns} WHERE run_id = ? AND kind = ? ORDER BY step DESC, id DESC LIMIT ?",
                             (run_id, kind, limit))
        else:
            rows = self.read(f"{columns} WHERE run_id = ? ORDER BY step DESC, id DESC LIMIT ?", (run_id, limit))
        stored = []
        for step, kind_, value, threshold, mask, message, detail, stamp in rows:
            if mask & 1:
                value = math.nan
            if mask & 2:
                threshold = math.nan
            item = {"step": step, "kind": kind_, "value": encode_float(value),
                    "threshold": encode_float(threshold), "message": message, "time": stamp}
            if detail:
                item["detail"] = json.loads(detail)
            stored.append(item)
        if kind not in (None, "clip"):
            return stored
        return merge_newest_first(stored, self.clip_events(run_id, limit), not self.is_postgres)[:limit]

    def clip_events(self, run_id: int, limit: int) -> list[dict]:
        """The newest `limit` clipped steps as clip events, newest first: the chunk summaries
        count each chunk's clipped steps, so only the newest chunks holding `limit` are read."""
        with self.snapshot() as cursor:
            summary = self.rows.summaries(cursor, run_id, 0, LAST_CHUNK, CHUNK)
            counts = summary.flags["clipped"].true if "clipped" in summary.flags else np.zeros(0, np.int64)
            wanted: list[int] = []
            found = 0
            for index in np.flatnonzero(counts)[::-1].tolist():
                wanted.append(int(summary.start[index]) // CHUNK)
                found += int(counts[index])
                if found >= limit:
                    break
            chunks = self.rows.load(cursor, run_id, wanted, CLIP_COLUMNS) if wanted else {}
        steps, values, missing = arrays_of(chunks.values(), CLIP_COLUMNS)
        rows = np.flatnonzero(values["clipped"] == 1.0)[::-1][:limit]
        threshold_missing = missing["threshold"]
        out = []
        for index in rows.tolist():
            value = encode_float(float(values["pre_norm"][index]))
            threshold = None if threshold_missing is not None and threshold_missing[index] else \
                encode_float(float(values["threshold"][index]))
            stamp = float(values["time"][index])
            out.append({"step": int(steps[index]), "kind": "clip", "value": value, "threshold": threshold,
                        "message": f"pre-clip norm {value} clipped", "time": stamp if stamp == stamp else None})
        return out

    def tensor_norms(self, run_id: int, start: int | None, end: int | None,
                     points: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(names, steps, norms[buckets, names], absent[buckets, names]) over a step range, at
        most about `points` buckets of consecutive steps; each tensor keeps its largest norm in
        a bucket (a NaN wins: it is the thing to see), a bucket is labelled by its first step,
        `absent` marks tensors a bucket never saw. From the per-64-step summaries, raw rows
        only where the range cuts a summary (`server/storage/chunks/tensors.py`)."""
        first, last = self.step_range(run_id)
        lo = first if start is None or first is not None and start < first else start
        hi = last if end is None or last is not None and end > last else end
        if first is None or lo > hi:
            return [], np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros((0, 0), bool)
        with self.snapshot() as cursor:
            found = heatmap(lambda chunk_id: self.rows.load_tensors(cursor, run_id, [chunk_id]).get(chunk_id),
                            lambda a, b: self.rows.tensor_summaries(cursor, run_id, a, b), lo, hi, points)
        return found.names, found.labels, found.norms, found.absent

    def iter_tensor_steps(self, run_id: int, start: int | None, end: int | None) -> Iterator[tuple]:
        """(steps, names, norms[steps, names], absent or None) per stored tensor chunk with steps
        in [start, end], ascending, from one snapshot, read a few chunks at a time."""
        lo = start if start is not None else 0
        hi = end if end is not None else 2**62
        with self.snapshot() as cursor:
            for chunk in self.rows.iter_tensor_range(cursor, run_id, lo // CHUNK, hi // CHUNK):
                mask = (chunk.steps >= lo) & (chunk.steps <= hi)
                if mask.any():
                    absent = None if chunk.present is None else ~chunk.present[mask]
                    yield chunk.steps[mask], chunk.names, chunk.norms[mask], absent

    def tensor_steps(self, run_id: int, start: int | None, end: int | None
                     ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(names, steps, norms[steps, names] float32, absent[steps, names]) of every step in
        [start, end] that reported tensor norms, names in first-seen order: the pieces of
        `iter_tensor_steps` in one matrix."""
        pieces = list(self.iter_tensor_steps(run_id, start, end))
        names: list[str] = []
        index: dict[str, int] = {}
        for _, piece_names, _, _ in pieces:
            for name in piece_names:
                if name not in index:
                    index[name] = len(names)
                    names.append(name)
        total = sum(len(piece[0]) for piece in pieces)
        steps = np.zeros(total, np.int64)
        norms = np.full((total, len(names)), np.nan, np.float32)
        absent = np.ones((total, len(names)), bool)
        row = 0
        for piece_steps, piece_names, piece_norms, piece_absent in pieces:
            rows = slice(row, row + len(piece_steps))
            columns = np.array([index[n] for n in piece_names], np.intp)
            steps[rows] = piece_steps
            norms[rows, columns] = piece_norms
            absent[rows, columns] = False if piece_absent is None else piece_absent
            row += len(piece_steps)
        return names, steps, norms, absent


def _meta_fragment(text: str | None):
    """Stored meta JSON as an orjson Fragment: passed through as it is. Ingest has always
    written it with orjson (valid JSON: NaN and Infinity become null), so it is not checked."""
    return orjson.Fragment(text or "{}")


class _Source:
    """The overview's ChunkSource over one snapshot cursor."""

    def __init__(self, rows: ChunkRows, cursor, run_id: int):
        self.rows, self.cursor, self.run_id = rows, cursor, run_id

    def summaries(self, first_chunk: int, last_chunk: int, width: int):
        return self.rows.summaries(self.cursor, self.run_id, first_chunk, last_chunk, width)

    def chunk(self, chunk_id: int, columns: tuple[str, ...]) -> Chunk | None:
        return self.rows.load(self.cursor, self.run_id, [chunk_id], columns).get(chunk_id)

    kept_flags = KEPT_FLAGS

    def kept_rows(self, chunk_ids: list[int], columns: tuple[str, ...]) -> dict[int, Chunk]:
        return self.rows.kept_rows(self.cursor, self.run_id, chunk_ids, columns)

    def chunks(self, chunk_ids: list[int], columns: tuple[str, ...]) -> dict[int, Chunk]:
        ids = sorted(chunk_ids)
        if ids and ids[-1] - ids[0] + 1 == len(ids):   # one range scan
            return self.rows.load_range(self.cursor, self.run_id, ids[0], ids[-1], columns)
        return self.rows.load(self.cursor, self.run_id, ids, columns)


class _CachedSource:
    """The overview's ChunkSource through a run's `OverviewEntry` (over one snapshot at the
    entry's version): whole-run summary levels, kept rows and decoded chunks come from the
    entry, and what the database gives is put there."""

    kept_flags = KEPT_FLAGS

    def __init__(self, source: _Source, entry: OverviewEntry, first_chunk: int, last_chunk: int):
        self.source, self.entry = source, entry
        self.first_chunk, self.last_chunk = first_chunk, last_chunk   # the run's stored chunks

    def summaries(self, first_chunk: int, last_chunk: int, width: int) -> Summary:
        level = self.entry.levels.get(width)
        if level is None:
            if first_chunk > self.first_chunk or last_chunk < self.last_chunk:   # not the whole run
                return self.source.summaries(first_chunk, last_chunk, width)
            level = self.source.summaries(0, LAST_CHUNK, width)
            self.entry.levels[width] = level
        a = int(np.searchsorted(level.start, first_chunk * CHUNK, side="left"))
        b = int(np.searchsorted(level.start, (last_chunk + 1) * CHUNK, side="left"))
        return level if a == 0 and b == len(level) else level.take(slice(a, b))

    def kept_rows(self, chunk_ids: list[int], columns: tuple[str, ...]) -> dict[int, Chunk]:
        held = self.entry.kept
        todo = [chunk_id for chunk_id in chunk_ids
                if chunk_id not in held or not held[chunk_id].values.keys() >= set(columns)]
        if todo:   # with the columns held already for them too (one entry per chunk)
            wanted = set(columns).union(*(held[c].values.keys() for c in todo if c in held))
            held.update(self.source.kept_rows(todo, tuple(name for name in SPEC if name in wanted)))
        return {chunk_id: held[chunk_id] for chunk_id in chunk_ids if chunk_id in held}

    def chunks(self, chunk_ids: list[int], columns: tuple[str, ...]) -> dict[int, Chunk]:
        held = self.entry.chunks
        todo = [chunk_id for chunk_id in chunk_ids if (chunk_id, columns) not in held]
        got = self.source.chunks(todo, columns) if todo else {}
        out = {}
        for chunk_id in chunk_ids:
            chunk = got.get(chunk_id) if chunk_id in got else held.get((chunk_id, columns))
            if chunk is not None:
                out[chunk_id] = chunk
        if len(todo) <= EDGE_CHUNKS:   # the edges of a range: keep them (not a whole decode)
            for chunk_id, chunk in got.items():
                self.entry.keep_chunk(chunk_id, columns, chunk)
        return out

    def chunk(self, chunk_id: int, columns: tuple[str, ...]) -> Chunk | None:
        return self.chunks([chunk_id], columns).get(chunk_id)


def merge_newest_first(stored: list[dict], extra: list[dict], nulls_last: bool) -> list[dict]:
    """Events read from the table (newest step first, stepless ones where the database
    sorts NULL) merged with `extra` events that all name a step, newest first; at equal
    steps the stored event comes first."""
    if not extra:
        return stored
    out: list[dict] = []
    pending = 0
    for item in stored:
        step = item["step"]
        while pending < len(extra) and (step is None and nulls_last or
                                        step is not None and extra[pending]["step"] > step):
            out.append(extra[pending])
            pending += 1
        out.append(item)
    out.extend(extra[pending:])
    return out
