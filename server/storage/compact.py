"""Compaction: once a run has moved past a group of chunks, the per-segment summary rows of
those written in many appends are joined into one row each, as a chunk written whole has.

An append writes its own summary entries and kept rows (a segment, `chunk_rows.py`), so a
chunk written in 500-step batches has 9 of each, and every cold overview decodes and joins
them all. Ingest calls `compact_summaries` when a batch opens a chunk in the next group of
COMPACT_GROUP chunks: no append comes to the chunks before it again (a late step rewrites
its chunk whole, as before). Columns stay in segments; only the overview's rows are joined.
Chunks of fewer than COMPACT_SEGMENTS segments are left as they are: their reads cost
little, and an agent's 2,000-step batches (3 per chunk) pay nothing for it.
"""
from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from gradwatch.server.storage.chunk_rows import KEPT_WIDTH, UPSERT, ChunkRows, join_packed_rows
from gradwatch.server.storage.chunks import BLOCK, CHUNK
from gradwatch.server.storage.chunks.codec import CodecError
from gradwatch.server.storage.chunks.summaries import (Summary, decode_summaries, encode_matrices, encode_summary,
                                                       join_split_blocks)

log = logging.getLogger("gradwatch.server")
COMPACT_SEGMENTS = 6   # chunks with this many segments or more have their summaries joined...
COMPACT_GROUP = 8      # ...this many chunks at a time


def compact_summaries(rows: ChunkRows, cursor, run_id: int, first: int, last: int) -> int:
    """Join the per-segment summary entries and kept rows of the chunks first..last that have
    COMPACT_SEGMENTS segments or more into one row of each (segment 0), as a chunk written
    whole has; their columns stay in segments. Returns how many chunks were joined.

    For chunks the run has moved past (no append comes to them again): every cold overview
    would otherwise decode and join their segments' blobs (a 1M-step run written in
    500-step batches: 9 per chunk, 126 ms against 60 over HTTP). What is read after is
    what `join_split_blocks` made of the segments at read time. Many chunks at once: one
    query, one decode and one join for all of them (a chunk alone cost ~1 ms)."""
    cursor.execute(rows.sql("SELECT chunk_id FROM chunks WHERE run_id = ? AND chunk_id BETWEEN ? AND ? "
                            "AND segments >= ? ORDER BY chunk_id"), (run_id, first, last, COMPACT_SEGMENTS))
    ids = [row[0] for row in cursor.fetchall()]
    if not ids:
        return 0
    cursor.execute(rows.sql(f"SELECT chunk_id, width, data FROM chunk_summaries WHERE run_id = ? AND width IN "
                            f"(?, ?) AND chunk_id IN ({', '.join('?' * len(ids))}) ORDER BY chunk_id, width, seg"),
                   (run_id, KEPT_WIDTH, BLOCK, *ids))
    entries: dict[int, list[bytes]] = defaultdict(list)
    kept: dict[int, list[bytes]] = defaultdict(list)
    for chunk_id, width, data in cursor.fetchall():
        (entries if width == BLOCK else kept)[chunk_id].append(bytes(data))
    ids = [chunk_id for chunk_id in ids if len(entries[chunk_id]) > 1]
    if not ids:
        return 0
    try:
        joined = join_split_blocks(decode_summaries([blob for chunk_id in ids for blob in entries[chunk_id]]))
    except (CodecError, ValueError, KeyError) as error:
        # A blob that does not decode must not fail the batch that happened to pass these chunks
        # (the agent would resend it forever): leave them in segments; reads report the blob.
        log.warning("run %s: summaries of chunks %s-%s not joined: %s", run_id, first, last, error)
        return 0
    bounds = np.searchsorted(joined.start, np.array([*ids, ids[-1] + 1]) * CHUNK)
    written = [(run_id, BLOCK, chunk_id, 0, _entries_blob(joined, bounds[i], bounds[i + 1]))
               for i, chunk_id in enumerate(ids)]
    kept_ids = []
    for chunk_id in ids:
        if len(kept[chunk_id]) > 1:   # segment 0 has one (written with it)
            try:
                blob = join_packed_rows(kept[chunk_id])
            except (CodecError, ValueError, KeyError):
                continue   # left in segments, read as they are
            if blob is not None:
                written.append((run_id, KEPT_WIDTH, chunk_id, 0, blob))
                kept_ids.append(chunk_id)
    for width, chunks in ((BLOCK, ids), (KEPT_WIDTH, kept_ids)):
        if chunks:
            cursor.execute(rows.sql(f"DELETE FROM chunk_summaries WHERE run_id = ? AND width = ? AND chunk_id IN "
                                    f"({', '.join('?' * len(chunks))}) AND seg > 0"), (run_id, width, *chunks))
    cursor.executemany(rows.sql(UPSERT["chunk_summaries"]), written)
    return len(ids)


def _entries_blob(joined: Summary, begin: int, end: int) -> bytes:
    """Entries begin..end of a joined summary, encoded (straight from its matrices when it has them)."""
    if joined.matrices is None:
        return encode_summary(joined.take(slice(begin, end)))
    meta, ints, floats = joined.matrices
    return encode_matrices(meta, ints[begin:end], floats[begin:end])
