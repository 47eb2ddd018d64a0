"""A run's chunks in SQL: the rows of `chunks`, `chunk_columns`, `chunk_summaries`,
`tensor_chunks` and `tensor_summaries` (tables.py), read and written on a DBAPI cursor.

The codec, merge and summaries are `server/storage/chunks/` (pure NumPy); this module
only moves their blobs in and out of the database, so ingest, reads and the
migration share one spelling of the SQL.

- A chunk holds steps [c*CHUNK, (c+1)*CHUNK). Its steps and each registry
  column are rows of `chunk_columns` keyed (run_id, chunk_id, seg, name): the
  rows one batch writes are neighbours in the table's B-tree, so the WAL gets a
  few leaf pages per batch, not one per column (schema 6; keyed by name first,
  827 KB of WAL per 2,000-step batch against 521 KB). A read of one column
  passes over the other columns' keys of the same chunks. A column added to the
  registry later needs no table change (a chunk without its row decodes it as
  all null). A column all null in what a write stores gets no row.
- Segments: a batch that only appends to a chunk writes its own rows as the
  chunk's next segment instead of rewriting the chunk (an agent appending
  2,000 steps at a time otherwise rewrote each 4,096-step chunk two or three
  times: measured, 1.3x the CPU of a row per step per batch, against 0.8x with
  segments). Such a batch needs none of the chunk's stored rows, so ingest
  does not read them (`Ingestor._appends`). Segments hold consecutive,
  ascending step ranges, so a chunk is its segments concatenated. A step
  landing inside a chunk, or a chunk with MAX_SEGMENTS segments, rewrites it
  as one segment.
- `chunks` (run_id, chunk_id, n, version, segments): the steps a chunk holds,
  the run version that last wrote it (a reader that holds version v fetches
  only the chunks written after v) and how many segments it has.
- `chunk_summaries` (run_id, width, chunk_id, seg): per segment, the 64-step
  summary entries of that segment's rows (width 64) and the rows an overview
  always keeps (width 0; a segment without any has no such row, segment 0
  always has one). An append writes its own entries, not the chunk's again (a
  500-step batch rewrote the chunk's whole summary, 48 KB, eight times per
  chunk; schema 7). A 64-step block two segments share has an entry in each:
  reads merge them (`summaries.join_split_blocks`), so a reader sees one entry
  per block as before; the overview's coarser widths (512, 4,096) are combined
  from them at read time. Once the run has moved past a chunk, its summary
  segments are joined into one (`compact.py`).
- `tensor_chunks` / `tensor_summaries`: per-tensor norms of a chunk's steps
  (a steps x tensors float32 matrix) and their per-64-step maxima.

Writes are upserts (`INSERT ... ON CONFLICT DO UPDATE`) of the handful of rows
a batch changes, sent with `executemany` (psycopg pipelines them).
"""
from __future__ import annotations

import functools
import json
from collections import defaultdict
from typing import Iterable

import numpy as np

from gradwatch.server.storage.chunks import (BLOCK, CHUNK, Chunk, TensorChunk, TensorSummary, combine,
                                             decode_chunk, decode_segments, decode_summaries, decode_tensor_summary,
                                             decode_tensors, encode_chunk, encode_tensor_summary, encode_tensors,
                                             merge_tensors, summarize_tensors)
from gradwatch.server.storage.chunks.codec import (NULL, CodecError, empty_values, join_segments, pack_arrays,
                                                   unpack_arrays)
from gradwatch.server.storage.chunks.downsample import kept_rows_of
from gradwatch.server.storage.chunks.summaries import (Summary, empty_summary, encode_matrices, join_split_blocks,
                                                       summary_matrices)
from gradwatch.server.storage.registry import FLOAT_FIELDS, STEP_COLUMNS, value_columns

SPEC: dict[str, str] = {column.name: column.type for column in STEP_COLUMNS if column.name != "step"}
KEY = "pre_norm"          # the column the overview keeps the min and max of
KEPT_FLAGS = ("spike", "nonfinite")   # rows the overview always keeps (with a non-finite key)
KEPT_WIDTH = 0            # `chunk_summaries.width` of the row holding a chunk's kept rows
IDS_PER_QUERY = 400       # chunk ids bound in one IN (...)
MAX_SEGMENTS = 16         # an append past this many segments rewrites the chunk as one

UPSERT = {
    "chunks": ("INSERT INTO chunks (run_id, chunk_id, n, version, segments) VALUES (?, ?, ?, ?, ?) "
               "ON CONFLICT (run_id, chunk_id) DO UPDATE SET n = excluded.n, version = excluded.version, "
               "segments = excluded.segments"),
    "chunk_columns": ("INSERT INTO chunk_columns (run_id, name, chunk_id, seg, data) VALUES (?, ?, ?, ?, ?) "
                      "ON CONFLICT (run_id, name, chunk_id, seg) DO UPDATE SET data = excluded.data"),
    "chunk_summaries": ("INSERT INTO chunk_summaries (run_id, width, chunk_id, seg, data) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (run_id, width, chunk_id, seg) DO UPDATE SET data = excluded.data"),
    "tensor_chunks": ("INSERT INTO tensor_chunks (run_id, chunk_id, seg, n, version, data) VALUES (?, ?, ?, ?, ?, ?) "
                      "ON CONFLICT (run_id, chunk_id, seg) DO UPDATE SET n = excluded.n, "
                      "version = excluded.version, data = excluded.data"),
    "tensor_summaries": ("INSERT INTO tensor_summaries (run_id, chunk_id, seg, data) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (run_id, chunk_id, seg) DO UPDATE SET data = excluded.data"),
}

_UNSEGMENTED_SUMMARY_UPSERT = ("INSERT INTO chunk_summaries (run_id, width, chunk_id, data) VALUES (?, ?, ?, ?) "
                               "ON CONFLICT (run_id, width, chunk_id) DO UPDATE SET data = excluded.data")

NULL_BLOB = bytes([NULL])   # an all-null column's blob (`codec.encode_column`)
CHUNK_TABLES = ("chunks", "chunk_columns", "chunk_summaries", "tensor_chunks", "tensor_summaries")


def _groups(ids: list[int]) -> Iterable[list[int]]:
    for begin in range(0, len(ids), IDS_PER_QUERY):
        yield ids[begin:begin + IDS_PER_QUERY]


def complete(chunk: Chunk) -> Chunk:
    """The chunk with every registry column, those it lacks as all null (a chunk made from an
    older layout, e.g. by a migration)."""
    for name, kind in SPEC.items():
        if name not in chunk.values:
            chunk.values[name] = empty_values(kind, len(chunk.steps))
            chunk.valid[name] = np.zeros(len(chunk.steps), bool)
    return chunk


def pack_rows(chunk: Chunk) -> bytes:
    """A few rows of a chunk in one blob: their steps, the columns' names, and the values and
    valid masks as two (columns x rows) matrices, float64 (bools as 0/1). No per-column codec:
    these are the handful of rows an overview always keeps, written with every segment, and a
    long run's overview reads one blob per segment (one matrix each, not an array per
    column: a 1M-step run's 961 blobs unpacked in 28 -> 6 ms). A column null in every row is
    left out (read back as null)."""
    names = [name for name in chunk.values if chunk.valid.get(name) is None or chunk.valid[name].any()]
    values = np.empty((len(names), len(chunk.steps)), np.float64)
    valid = np.ones((len(names), len(chunk.steps)), dtype=bool)
    for row, name in enumerate(names):
        values[row] = chunk.values[name]
        if chunk.valid.get(name) is not None:
            valid[row] = chunk.valid[name]
    return pack_arrays({"step": chunk.steps, "names": json.dumps(names).encode(), "values": values, "valid": valid})


def _as_kind(kind: str, values: np.ndarray) -> np.ndarray:
    return values if kind == "float" else values != 0 if kind == "bool" else values.astype(np.int64)


def unpack_rows(chunk_id: int, blobs: bytes | list[bytes], columns: tuple[str, ...]) -> Chunk:
    """`pack_rows` back, with `columns` (a column not stored is all null); several blobs (a
    chunk's segments, in order) as one chunk, their matrices joined before any column is cut
    out. Reads the layout of schemas 5 and 6 too (an array per column: `v:name`, and `m:name`
    where some are null)."""
    parts = [unpack_arrays(blob) for blob in ([blobs] if isinstance(blobs, (bytes, bytearray, memoryview)) else blobs)]
    for arrays in parts:
        steps = arrays.get("step")
        if not isinstance(steps, np.ndarray) or steps.dtype != np.int64:
            raise CodecError(f"chunk {chunk_id}: not a kept-rows blob")
    if len(parts) == 1:
        return _unpack_one(chunk_id, parts[0], columns)
    joined = _joined_matrices(parts)
    if joined is None:
        return join_segments(chunk_id, [_unpack_one(chunk_id, arrays, columns) for arrays in parts], columns)
    return _unpack_one(chunk_id, joined, columns)


def join_packed_rows(blobs: list[bytes]) -> bytes | None:
    """Kept-rows blobs of one chunk's segments (in order) as one blob, as `pack_rows` of all
    their rows would be; None when they are not all of the matrix layout with the same
    columns (the blobs are left as they are: `unpack_rows` reads them)."""
    joined = _joined_matrices([unpack_arrays(blob) for blob in blobs])
    return None if joined is None else pack_arrays(joined)


def _joined_matrices(parts: list[dict]) -> dict | None:
    if not all("names" in arrays and arrays["names"] == parts[0]["names"] for arrays in parts):
        return None
    return {"step": np.concatenate([arrays["step"] for arrays in parts]), "names": parts[0]["names"],
            "values": np.concatenate([arrays["values"] for arrays in parts], axis=1),
            "valid": np.concatenate([arrays["valid"] for arrays in parts], axis=1)}


@functools.lru_cache(maxsize=64)
def _names(text: bytes) -> dict[str, int]:
    """A kept-rows blob's column names -> row (the blobs of a run share theirs: parsed once)."""
    return {name: row for row, name in enumerate(json.loads(text))}


def _unpack_one(chunk_id: int, arrays: dict, columns: tuple[str, ...]) -> Chunk:
    """One kept-rows blob of either layout (or several of the matrix layout joined), unpacked."""
    steps = arrays["step"]
    chunk = Chunk(chunk_id, steps)
    if "names" in arrays:
        stored = _names(bytes(arrays["names"]))
        matrix, masks = arrays["values"], arrays["valid"]
        if matrix.shape != (len(stored), len(steps)) or masks.shape != matrix.shape:
            raise CodecError(f"chunk {chunk_id}: kept rows of the wrong shape")
    for name in columns:
        if "names" in arrays:
            row = stored.get(name)
            values = None if row is None else _as_kind(SPEC[name], matrix[row])
            valid = None if row is None or masks[row].all() else masks[row]
        else:
            values, valid = arrays.get("v:" + name), arrays.get("m:" + name)
        if values is None:
            chunk.values[name], chunk.valid[name] = empty_values(SPEC[name], len(steps)), np.zeros(len(steps), bool)
        else:
            chunk.values[name], chunk.valid[name] = values, valid
    return chunk


def summary_blob(chunk: Chunk) -> bytes:
    """The 64-step summary of a chunk's rows, encoded (the only width stored: coarser ones are
    combined from it when read, many chunks in one vectorised pass; writing three widths at
    ingest took 55% of a batch's time). Straight from the two matrices, no Summary object."""
    return encode_matrices(*summary_matrices(chunk, SPEC, KEY))


class ChunkRows:
    """SQL for the chunk tables; `sql` turns `?` into the driver's placeholder.

    `summary_segments=False` writes `chunk_summaries` as schema 5 and 6 had it (no `seg`:
    one summary per chunk and width), for migration 0005, which stores whole chunks only."""

    def __init__(self, sql, summary_segments: bool = True):
        self.sql = sql
        self.summary_segments = summary_segments

    # ----- steps -----

    def load(self, cursor, run_id: int, chunk_ids: list[int], columns: tuple[str, ...] | None = None
             ) -> dict[int, Chunk]:
        """The stored chunks among `chunk_ids`, decoded with `columns` (all by default)."""
        columns = tuple(SPEC) if columns is None else columns
        names = ("step",) + columns
        rows: list[tuple] = []
        name_marks = ", ".join("?" * len(names))
        for group in _groups(sorted(set(chunk_ids))):
            cursor.execute(self.sql(f"SELECT chunk_id, seg, name, data FROM chunk_columns WHERE run_id = ? "
                                    f"AND name IN ({name_marks}) AND chunk_id IN ({', '.join('?' * len(group))})"),
                           (run_id, *names, *group))
            rows.extend(cursor.fetchall())
        return _decode_rows(rows, columns)

    def load_range(self, cursor, run_id: int, first: int, last: int, columns: tuple[str, ...],
                   since_version: int | None = None) -> dict[int, Chunk]:
        """Chunks first..last (ids) with `columns`; only those written after `since_version` if given."""
        names = ("step",) + columns
        name_marks = ", ".join("?" * len(names))
        if since_version is None:
            cursor.execute(self.sql(f"SELECT chunk_id, seg, name, data FROM chunk_columns WHERE run_id = ? AND "
                                    f"name IN ({name_marks}) AND chunk_id BETWEEN ? AND ?"),
                           (run_id, *names, first, last))
        else:
            cursor.execute(self.sql(f"SELECT c.chunk_id, c.seg, c.name, c.data FROM chunks k JOIN chunk_columns c "
                                    f"ON c.run_id = k.run_id AND c.chunk_id = k.chunk_id AND c.name IN "
                                    f"({name_marks}) WHERE k.run_id = ? AND k.version > ? "
                                    f"AND k.chunk_id BETWEEN ? AND ?"),
                           (*names, run_id, since_version, first, last))
        return _decode_rows(cursor.fetchall(), columns)

    def chunk_state(self, cursor, run_id: int, chunk_id: int) -> tuple[int, int] | None:
        """(rows, segments) of a stored chunk, None when it is not stored."""
        cursor.execute(self.sql("SELECT n, segments FROM chunks WHERE run_id = ? AND chunk_id = ?"), (run_id, chunk_id))
        row = cursor.fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def write(self, cursor, run_id: int, version: int, chunks: list[Chunk],
              appends: dict[int, tuple[int, int]] | None = None, fresh: set[int] | frozenset = frozenset()
              ) -> None:
        """Upsert the chunks, their summaries and their `chunks` rows.

        A chunk in `appends` (chunk id -> (segment number, rows stored before)) holds only
        rows appended after the stored ones: they are written as that segment, with their
        own summary entries and kept rows, and the chunk counts both. Any other chunk is
        written whole as segment 0, and its other segments removed unless it is in `fresh`
        (stored for the first time)."""
        if not chunks:
            return
        appends = appends or {}
        column_rows, summary_rows, chunk_rows, rewritten = [], [], [], []
        for chunk in map(complete, chunks):
            seg, before = appends.get(chunk.chunk_id, (0, 0))
            for name, blob in encode_chunk(chunk, SPEC).items():
                if blob != NULL_BLOB:   # an all-null column needs no row: a missing one reads as null
                    column_rows.append((run_id, name, chunk.chunk_id, seg, blob))
            if seg == 0 and chunk.chunk_id not in fresh:
                rewritten.append((run_id, chunk.chunk_id))
            summary_rows.append((BLOCK, chunk.chunk_id, seg, summary_blob(chunk)))
            kept = kept_rows_of(chunk, KEY, KEPT_FLAGS)
            if seg == 0 or len(kept):   # segment 0 always has one: a chunk without it is decoded instead
                summary_rows.append((KEPT_WIDTH, chunk.chunk_id, seg, pack_rows(kept)))
            chunk_rows.append((run_id, chunk.chunk_id, before + len(chunk), version, seg + 1))
        if rewritten:   # by the key's prefix: a few index seeks per chunk
            names = ("step",) + tuple(SPEC)
            cursor.executemany(self.sql(f"DELETE FROM chunk_columns WHERE run_id = ? AND name IN "
                                        f"({', '.join('?' * len(names))}) AND chunk_id = ? AND seg > 0"),
                               [(r, *names, c) for r, c in rewritten])
            if self.summary_segments:
                cursor.executemany(self.sql("DELETE FROM chunk_summaries WHERE run_id = ? AND width IN (?, ?) "
                                            "AND chunk_id = ? AND seg > 0"),
                                   [(r, KEPT_WIDTH, BLOCK, c) for r, c in rewritten])
        cursor.executemany(self.sql(UPSERT["chunk_columns"]), column_rows)
        if self.summary_segments:
            cursor.executemany(self.sql(UPSERT["chunk_summaries"]), [(run_id, *row) for row in summary_rows])
        else:
            cursor.executemany(self.sql(_UNSEGMENTED_SUMMARY_UPSERT),
                               [(run_id, width, chunk_id, data) for width, chunk_id, _, data in summary_rows])
        cursor.executemany(self.sql(UPSERT["chunks"]), chunk_rows)

    def summaries(self, cursor, run_id: int, first: int, last: int, width: int) -> Summary:
        """Entries of `width` (a multiple of BLOCK) over the stored chunks first..last, ascending."""
        cursor.execute(self.sql("SELECT data FROM chunk_summaries WHERE run_id = ? AND width = ? "
                                "AND chunk_id BETWEEN ? AND ? ORDER BY chunk_id, seg"), (run_id, BLOCK, first, last))
        return _joined([row[0] for row in cursor.fetchall()], width)

    def summaries_of(self, cursor, run_id: int, chunk_ids: list[int]) -> Summary:
        """The 64-step entries of the stored chunks among `chunk_ids` (sorted), ascending."""
        blobs: list[bytes] = []
        for group in _groups(chunk_ids):
            cursor.execute(self.sql(f"SELECT data FROM chunk_summaries WHERE run_id = ? AND width = ? AND chunk_id "
                                    f"IN ({', '.join('?' * len(group))}) ORDER BY chunk_id, seg"),
                           (run_id, BLOCK, *group))
            blobs.extend(bytes(row[0]) for row in cursor.fetchall())
        return _joined(blobs, BLOCK)

    def kept_rows(self, cursor, run_id: int, chunk_ids: list[int], columns: tuple[str, ...]) -> dict[int, Chunk]:
        """The kept rows (`KEPT_FLAGS`, non-finite key) of the chunks among `chunk_ids`, each its
        segments' joined; a chunk whose rows are not readable is left out (the overview decodes it)."""
        blobs: dict[int, list[bytes]] = defaultdict(list)
        for group in _groups(sorted(set(chunk_ids))):
            cursor.execute(self.sql(f"SELECT chunk_id, data FROM chunk_summaries WHERE run_id = ? AND width = ? "
                                    f"AND chunk_id IN ({', '.join('?' * len(group))}) ORDER BY chunk_id, seg"),
                           (run_id, KEPT_WIDTH, *group))
            for chunk_id, data in cursor.fetchall():
                blobs[chunk_id].append(bytes(data))
        out: dict[int, Chunk] = {}
        for chunk_id, found in blobs.items():
            try:
                out[chunk_id] = unpack_rows(chunk_id, found, columns)
            except CodecError:
                continue
        return out

    # ----- per-tensor norms -----

    def load_tensors(self, cursor, run_id: int, chunk_ids: list[int]) -> dict[int, TensorChunk]:
        """The stored tensor chunks among `chunk_ids`, each its segments joined."""
        rows: list[tuple] = []
        for group in _groups(sorted(set(chunk_ids))):
            cursor.execute(self.sql(f"SELECT chunk_id, seg, data FROM tensor_chunks WHERE run_id = ? "
                                    f"AND chunk_id IN ({', '.join('?' * len(group))}) ORDER BY chunk_id, seg"),
                           (run_id, *group))
            rows.extend(cursor.fetchall())
        return {chunk.chunk_id: chunk for chunk in _join_tensor_rows(rows)}

    def iter_tensor_range(self, cursor, run_id: int, first: int, last: int, per_fetch: int = 8):
        """The tensor chunks first..last, ascending, each its segments joined; read `per_fetch`
        rows at a time."""
        cursor.execute(self.sql("SELECT chunk_id, seg, data FROM tensor_chunks WHERE run_id = ? "
                                "AND chunk_id BETWEEN ? AND ? ORDER BY chunk_id, seg"), (run_id, first, last))
        held: list[tuple] = []
        while True:
            rows = cursor.fetchmany(per_fetch)
            if not rows:
                break
            for row in rows:
                if held and row[0] != held[0][0]:
                    yield from _join_tensor_rows(held)
                    held = []
                held.append(row)
        if held:
            yield from _join_tensor_rows(held)

    def tensor_summaries(self, cursor, run_id: int, first: int, last: int) -> list[TensorSummary]:
        """The 64-step maxima of every segment of the chunks first..last (a block two segments
        share appears in both: the heatmap takes the larger)."""
        cursor.execute(self.sql("SELECT data FROM tensor_summaries WHERE run_id = ? "
                                "AND chunk_id BETWEEN ? AND ? ORDER BY chunk_id, seg"), (run_id, first, last))
        return [decode_tensor_summary(row[0]) for row in cursor.fetchall()]

    def tensor_segments(self, cursor, run_id: int, chunk_ids: list[int]) -> dict[int, int]:
        """How many segments each stored chunk among `chunk_ids` has."""
        out: dict[int, int] = {}
        for group in _groups(sorted(set(chunk_ids))):
            cursor.execute(self.sql(f"SELECT chunk_id, MAX(seg) FROM tensor_chunks WHERE run_id = ? "
                                    f"AND chunk_id IN ({', '.join('?' * len(group))}) GROUP BY chunk_id"),
                           (run_id, *group))
            out.update({chunk_id: int(last) + 1 for chunk_id, last in cursor.fetchall()})
        return out

    def write_tensors(self, cursor, run_id: int, version: int, parts: list[tuple[int, TensorChunk]]) -> None:
        """Upsert tensor chunk segments ((segment number, rows)); a segment 0 is a whole chunk,
        so its other segments are removed."""
        if not parts:
            return
        whole = [(run_id, chunk.chunk_id) for seg, chunk in parts if seg == 0]
        if whole:
            for table in ("tensor_chunks", "tensor_summaries"):
                cursor.executemany(self.sql(f"DELETE FROM {table} WHERE run_id = ? AND chunk_id = ? AND seg > 0"),
                                   whole)
        cursor.executemany(self.sql(UPSERT["tensor_chunks"]),
                           [(run_id, c.chunk_id, seg, len(c.steps), version, encode_tensors(c)) for seg, c in parts])
        cursor.executemany(self.sql(UPSERT["tensor_summaries"]),
                           [(run_id, c.chunk_id, seg, encode_tensor_summary(summarize_tensors(c))) for seg, c in parts])

    def delete_run(self, cursor, run_id: int) -> dict[str, int]:
        """Remove a run's chunk rows; returns the steps and the tensor-norm steps they held."""
        cursor.execute(self.sql("SELECT COALESCE(SUM(n), 0) FROM chunks WHERE run_id = ?"), (run_id,))
        steps = int(cursor.fetchone()[0])
        cursor.execute(self.sql("SELECT COALESCE(SUM(n), 0) FROM tensor_chunks WHERE run_id = ?"), (run_id,))
        tensor_steps = int(cursor.fetchone()[0])
        for table in CHUNK_TABLES:
            cursor.execute(self.sql(f"DELETE FROM {table} WHERE run_id = ?"), (run_id,))
        return {"steps": steps, "tensor_norms": tensor_steps}


def _joined(blobs: list, width: int) -> Summary:
    """Stored 64-step summary blobs (by chunk, then segment) as one summary of `width`."""
    if not blobs:
        return empty_summary(SPEC, KEY, width)
    summary = decode_summaries(blobs)
    # a coarser width groups a split block's entries with the rest of its group: no join first
    return join_split_blocks(summary) if width == BLOCK else combine(summary, width)


def _decode_rows(rows: list[tuple], columns: tuple[str, ...]) -> dict[int, Chunk]:
    """(chunk_id, seg, name, data) rows as decoded chunks, each its segments concatenated."""
    blobs: dict[int, dict[int, dict[str, bytes]]] = defaultdict(lambda: defaultdict(dict))
    for chunk_id, seg, name, data in rows:
        blobs[chunk_id][seg][name] = data
    out: dict[int, Chunk] = {}
    for chunk_id in sorted(blobs):
        segments = [segment for _, segment in sorted(blobs[chunk_id].items()) if "step" in segment]
        if len(segments) == 1:
            out[chunk_id] = decode_chunk(chunk_id, segments[0], SPEC, columns)
        elif segments:
            out[chunk_id] = decode_segments(chunk_id, segments, SPEC, columns)
    return out


def _join_tensor_rows(rows: list[tuple]) -> list[TensorChunk]:
    """(chunk_id, seg, data) rows, ordered by chunk and segment, as one TensorChunk per chunk."""
    out: list[TensorChunk] = []
    start = 0
    while start < len(rows):
        end = start
        while end < len(rows) and rows[end][0] == rows[start][0]:
            end += 1
        parts = [decode_tensors(chunk_id, data) for chunk_id, _, data in rows[start:end]]
        out.append(parts[0] if len(parts) == 1 else join_tensor_segments(parts))
        start = end
    return out


def join_tensor_segments(parts: list[TensorChunk]) -> TensorChunk:
    """Segments of one tensor chunk (disjoint steps, any order, tensor names may differ) as one:
    names in first-seen order, rows sorted by step, `present` where a segment lacked a name."""
    joined = parts[0]
    for part in parts[1:]:
        joined = merge_tensors(joined, joined.chunk_id, part.steps, part.names, part.norms,
                               present=part.present)
    return joined


def arrays_of(chunks: Iterable[Chunk], columns: tuple[str, ...]
              ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray | None]]:
    """Decoded chunks (ascending) as the server's run arrays: steps, float64 values with NaN where
    NaN or missing (bools 0.0/1.0/NaN), and per column a mask of the missing values (None: none)."""
    chunks = list(chunks)
    columns = value_columns(columns)
    if not chunks:
        return np.zeros(0, np.int64), {n: np.zeros(0) for n in columns}, {n: None for n in columns}
    steps = np.concatenate([c.steps for c in chunks])
    values: dict[str, np.ndarray] = {}
    missing: dict[str, np.ndarray | None] = {}
    for name in columns:
        parts = [c.values[name] for c in chunks]
        oks = [c.valid.get(name) for c in chunks]
        column = np.concatenate(parts).astype(np.float64, copy=False)
        if all(ok is None for ok in oks):
            values[name], missing[name] = column, None
            continue
        valid = np.concatenate([np.ones(len(c.steps), bool) if ok is None else ok for c, ok in zip(chunks, oks)])
        if name not in FLOAT_FIELDS:
            column = np.where(valid, column, np.nan)
        absent = ~valid
        values[name], missing[name] = column, absent if absent.any() else None
    return steps, values, missing


def chunk_span(lo: int, hi: int) -> tuple[int, int]:
    return lo // CHUNK, hi // CHUNK
