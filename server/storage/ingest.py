"""Ingest: store one validated batch (and events, meta) in one transaction.

One transaction per batch on a raw DBAPI connection. The run's row is locked
first (SQLite: `BEGIN IMMEDIATE` holds the write lock; PostgreSQL: `SELECT
... FOR UPDATE`), then the chunks the batch touches are read (but the run's
newest chunk when the batch only appends to it: those rows are written as the
chunk's next segment, `Ingestor._appends`), the batch is merged into them
(`server/storage/chunks/merge.py`: a step not stored yet is added, an equal
resend is a duplicate, a different one a conflict, stored as a `conflict`
event and never an overwrite), and the changed chunks are written
back with their summaries and the run's new version. A late step lands in its
own chunk; no other chunk is read or written. A batch that opens a chunk in the
next group of eight joins the summary segments of the group the run moved past
(`compact.py`). The batch is all or nothing.
Clip events are not stored: reads derive them from the clipped steps.

Whoever wants to know of newly stored rows (the live feed) registers a
callback in `Ingestor.on_stored`; it is called inside the transaction with
the cursor (so a PostgreSQL NOTIFY is delivered only if the batch commits).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from itertools import groupby, repeat
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import orjson
from sqlalchemy import Engine

from gradwatch.server.storage.engine import Database, rollback_quietly
from gradwatch.server.storage.chunks import CHUNK, merge_batch, merge_tensors, split_by_chunk
from gradwatch.server.storage.chunk_rows import MAX_SEGMENTS, SPEC, ChunkRows
from gradwatch.server.storage.compact import COMPACT_GROUP, compact_summaries
from gradwatch.server.storage.serialise import encode_floats
from gradwatch.server.storage.wal import WalCheckpointer

if TYPE_CHECKING:
    from gradwatch.server.wire import Batch

INGEST_CONFIGURED = "gradwatch_ingest_configured"  # key in a pooled connection's .info
MAX_RUN_META_BYTES = 1 << 20   # a run's stored `meta` (the merge of every message's), as JSON


class MetaTooLarge(ValueError):
    """A message whose `meta` would take the run's stored meta past `MAX_RUN_META_BYTES`; the
    message is refused whole (nothing of it stored). `status`: the HTTP status that says so."""

    status = 413

    def __init__(self, run: str, size: int, limit: int):
        super().__init__(f"run {run!r}: its meta would be {size} bytes as JSON with this message's, over the "
                         f"limit of {limit} bytes ({limit / (1 << 20):g} MiB) per run; send fewer or smaller "
                         f"meta keys (a key sent again replaces its value)")
        self.size, self.limit = size, limit


@dataclass
class IngestResult:
    run: str
    accepted: int
    duplicates: int
    conflicts: int
    new_mask: np.ndarray | None = None   # which rows of the batch were stored now
    run_id: int | None = None            # None: nothing was stored (an empty message)

    def answer(self) -> dict[str, int]:
        return {"accepted": self.accepted, "duplicates": self.duplicates, "conflicts": self.conflicts}




@dataclass(frozen=True)
class StoredRows:
    """What one committed-to-be batch stored, for `Ingestor.on_stored` callbacks."""

    run: str
    run_id: int
    first: int
    last: int


def now() -> float:
    return time.time()


def _event_row(run_id: int, step: int | None, kind: str, value: float | None, threshold: float | None,
               message: str, detail: Any, timestamp: float | None) -> tuple:
    mask = 0
    if value is not None and value != value:
        value, mask = None, mask | 1
    if threshold is not None and threshold != threshold:
        threshold, mask = None, mask | 2
    detail_text = orjson.dumps(detail).decode() if detail is not None else None
    return (run_id, step, kind, value, threshold, mask, message, detail_text, timestamp)


class Ingestor(Database):
    """The write path of one server process."""

    def __init__(self, engine: Engine, run_ids: dict[str, int]):
        super().__init__(engine)
        self._run_ids = run_ids
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self.rows = ChunkRows(self._sql)
        self.on_stored: list[Callable[[Any, StoredRows], None]] = []
        self.after_commit: list[Callable[[str, Batch, IngestResult], None]] = []  # committed; must not block
        self.max_meta_bytes = MAX_RUN_META_BYTES
        self.checkpointer: WalCheckpointer | None = None
        if self.is_sqlite and str(self.read("PRAGMA journal_mode")[0][0]).lower() == "wal":
            self.checkpointer = WalCheckpointer(engine, self._write_lock)

    def _ensure_run(self, cursor, name: str) -> tuple[int, int, int | None]:
        """The run's id (creating the run), version and last stored step (None before any), the
        run's row locked until commit.

        SQLite holds the database's write lock already (`BEGIN IMMEDIATE`); PostgreSQL
        takes the row lock (`FOR UPDATE`), so batches of one run from several servers
        merge into its chunks one after the other and none overwrites another's rows.
        """
        lock = "" if self.is_sqlite else " FOR UPDATE"
        cursor.execute(self._sql(f"SELECT id, version, last_step FROM runs WHERE name = ?{lock}"), (name,))
        row = cursor.fetchone()
        if row:
            return row[0], row[1], row[2]
        stamp = now()
        cursor.execute(self._sql("INSERT INTO runs (name, created, updated, meta, steps, clips, clip_flags, "
                                 "spikes, nonfinite, version) VALUES (?, ?, ?, '{}', 0, 0, 0, 0, 0, 0) "
                                 "ON CONFLICT (name) DO NOTHING"), (name, stamp, stamp))
        cursor.execute(self._sql(f"SELECT id, version, last_step FROM runs WHERE name = ?{lock}"), (name,))
        row = cursor.fetchone()
        return row[0], row[1], row[2]

    def ingest(self, run: str, batch: Batch | None, meta: dict | None = None,
               events: list[dict] | None = None) -> IngestResult:
        """Store one batch in one transaction; returns counts once it is committed."""
        if self._write_lock is not None:
            with self._write_lock:
                return self._ingest_once(run, batch, meta, events)
        return self._ingest_once(run, batch, meta, events)

    def _configure_ingest_connection(self, cursor) -> None:
        """Once per pooled SQLite connection, the first time it ingests (outside a transaction):
        `wal_autocheckpoint=0` when the checkpointer thread does the checkpoints.

        Foreign keys stay on (as every connection has them): turning them off for ingest
        measured about 6% faster, not worth a database that no longer checks itself.
        """
        if self.checkpointer is not None:
            cursor.execute("PRAGMA wal_autocheckpoint=0")

    def _ingest_once(self, run: str, batch: Batch | None, meta: dict | None,
                     events: list[dict] | None) -> IngestResult:
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            if self.is_sqlite and not raw.info.get(INGEST_CONFIGURED):
                self._configure_ingest_connection(cursor)
                raw.info[INGEST_CONFIGURED] = True
            try:
                self._begin(cursor, write=True)
                result = self._ingest_in_transaction(cursor, run, batch, meta, events)
                if self.is_sqlite:
                    cursor.execute("COMMIT")
                    if self.checkpointer is not None:
                        self.checkpointer.request()
                else:
                    raw.commit()
                if result.run_id is not None:  # only once committed: no reader sees it before
                    self._run_ids[run] = result.run_id
                if result.accepted and batch is not None:
                    self._after_commit(run, batch, result)
                return result
            except BaseException:
                rollback_quietly(raw, self.is_sqlite)
                raise
        finally:
            raw.close()

    def _after_commit(self, run: str, batch: Batch, result: IngestResult) -> None:
        for callback in self.after_commit:  # the batch is stored: a hook's failure is only logged
            try:
                callback(run, batch, result)
            except Exception:
                logging.getLogger("gradwatch.server").exception("after-commit hook failed")

    def _ingest_in_transaction(self, cursor, run: str, batch: Batch | None, meta: dict | None,
                               events: list[dict] | None) -> IngestResult:
        if (batch is None or not len(batch)) and not events and not meta:
            return IngestResult(run=run, accepted=0, duplicates=0, conflicts=0)  # stores no run
        run_id, version, last_step = self._ensure_run(cursor, run)
        meta_text = self._merged_meta(cursor, run, run_id, meta) if meta else None
        stamp = now()
        accepted = duplicates = conflicts = 0
        new_mask = None
        event_rows: list[tuple] = []
        counts = {"steps": 0, "clips": 0, "clip_flags": 0, "spikes": 0, "nonfinite": 0}
        first = last = None
        if batch is not None and len(batch):
            steps = batch.steps
            by_chunk = split_by_chunk(steps)
            appends = self._appends(cursor, run_id, last_step, steps, by_chunk)
            # a chunk past the run's last stored step holds nothing yet, and an append needs
            # none of the stored rows: neither is read
            newest = -1 if last_step is None else last_step // CHUNK
            wanted = [i for i, _ in by_chunk if i <= newest and i not in appends]
            loaded = self.rows.load(cursor, run_id, wanted) if wanted else {}
            sent = {name: (column.values, column.missing) for name, column in batch.columns.items()}
            merge = merge_batch(loaded.get, steps, sent, SPEC)
            new_mask = merge.added
            accepted, duplicates, conflicts = int(new_mask.sum()), int(merge.duplicate.sum()), len(merge.conflicts)
            if accepted:
                version += 1
                changed = [result.chunk for result in merge.chunks.values() if result.changed]
                fresh = {chunk.chunk_id for chunk in changed if chunk.chunk_id > newest}
                self.rows.write(cursor, run_id, version, changed, appends, fresh)
                if fresh and newest >= 0 and max(fresh) // COMPACT_GROUP > newest // COMPACT_GROUP:
                    # the run moved past the group of chunks its newest was in: join their segments' summaries
                    group = newest // COMPACT_GROUP * COMPACT_GROUP
                    compact_summaries(self.rows, cursor, run_id, group, group + COMPACT_GROUP - 1)
            for conflict in merge.conflicts:
                differing = list(conflict.fields)
                event_rows.append(_event_row(
                    run_id, conflict.step, "conflict", None, None,
                    f"step {conflict.step} was sent again with different values ({', '.join(differing)}); "
                    f"the stored values were kept",
                    {"fields": differing}, stamp))
            if accepted:
                event_rows.extend(self._derived_events(run_id, batch, new_mask))
                counts["steps"] = accepted
                new_steps = steps[new_mask]
                first, last = int(new_steps.min()), int(new_steps.max())
                for name, key in (("clipped", "clips"), ("spike", "spikes")):
                    column = batch.columns.get(name)
                    if column is not None:
                        counts[key] = int(np.count_nonzero(column.values[new_mask] == 1.0))
                clipped = batch.columns.get("clipped")
                if clipped is not None:
                    counts["clip_flags"] = accepted if clipped.missing is None else \
                        int(np.count_nonzero(~clipped.missing[new_mask]))
                counts["nonfinite"] = int(np.count_nonzero(self._nonfinite_rows(batch)[new_mask]))
                if batch.tensor_norms is not None:
                    self._store_tensor_norms(cursor, run_id, version, batch, new_mask)
        for item in events or []:
            event_rows.append(_event_row(run_id, item.get("step"), item["kind"], item.get("value"),
                                         item.get("threshold"), item.get("message", ""),
                                         item.get("detail"), item.get("time", stamp)))
        # In order (ids break ties between events of one step), in runs with and without a
        # detail: derived events have none, and sqlite3 binds None through its adapter lookup.
        for plain, group in groupby(event_rows, key=lambda row: row[7] is None):
            if plain:
                cursor.executemany(self._sql("INSERT INTO events (run_id, step, kind, value, threshold, "
                                             "nan_mask, message, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                                   [row[:7] + row[8:] for row in group])
            else:
                cursor.executemany(self._sql("INSERT INTO events (run_id, step, kind, value, threshold, "
                                             "nan_mask, message, detail, time) "
                                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"), list(group))
        cursor.execute(self._sql(
            "UPDATE runs SET steps = steps + ?, clips = clips + ?, clip_flags = clip_flags + ?, "
            "spikes = spikes + ?, nonfinite = nonfinite + ?, updated = ?, version = version + ?, "
            "first_step = CASE WHEN CAST(? AS BIGINT) IS NOT NULL AND (first_step IS NULL "
            "OR CAST(? AS BIGINT) < first_step) THEN CAST(? AS BIGINT) ELSE first_step END, "
            "last_step = CASE WHEN CAST(? AS BIGINT) IS NOT NULL AND (last_step IS NULL "
            "OR CAST(? AS BIGINT) > last_step) THEN CAST(? AS BIGINT) ELSE last_step END, "
            "meta = COALESCE(CAST(? AS TEXT), meta) WHERE id = ?"),
            (counts["steps"], counts["clips"], counts["clip_flags"], counts["spikes"], counts["nonfinite"], stamp,
             1 if accepted else 0, first, first, first, last, last, last, meta_text, run_id))
        if accepted:
            stored_rows = StoredRows(run, run_id, first, last)
            for callback in self.on_stored:
                callback(cursor, stored_rows)
        return IngestResult(run=run, accepted=accepted, duplicates=duplicates, conflicts=conflicts,
                            new_mask=new_mask, run_id=run_id)

    def _merged_meta(self, cursor, run: str, run_id: int, meta: dict) -> str | None:
        """The run's stored meta with `meta`'s keys set, as JSON text; None when that changes
        nothing (no write). MetaTooLarge when it would be over `max_meta_bytes`: checked
        first in the transaction, so a refused message stores nothing."""
        cursor.execute(self._sql("SELECT meta FROM runs WHERE id = ?"), (run_id,))
        stored = cursor.fetchone()[0] or "{}"
        merged = orjson.loads(stored)   # always written by orjson.dumps
        merged.update(meta)
        text = orjson.dumps(merged)
        if len(text) == len(stored) and text.decode() == stored:
            return None
        if len(text) > self.max_meta_bytes:
            raise MetaTooLarge(run, len(text), self.max_meta_bytes)
        return text.decode()

    def _appends(self, cursor, run_id: int, last_step: int | None, steps: np.ndarray,
                 by_chunk: list[tuple[int, np.ndarray]]) -> dict[int, tuple[int, int]]:
        """{chunk id: (segment number, rows stored)} for the run's newest chunk when every step
        the batch sends to it comes after the run's last stored step (what an agent sends):
        those rows are all new, so they are merged into nothing and written as the chunk's next
        segment, without reading the chunk. Empty otherwise, or when the chunk has
        MAX_SEGMENTS segments (it is read and rewritten as one)."""
        if last_step is None:
            return {}
        newest = last_step // CHUNK
        rows = next((rows for chunk_id, rows in by_chunk if chunk_id == newest), None)
        if rows is None or int(steps[rows].min()) <= last_step:
            return {}
        state = self.rows.chunk_state(cursor, run_id, newest)
        if state is None or state[1] >= MAX_SEGMENTS:
            return {}
        return {newest: (state[1], state[0])}

    @staticmethod
    def _nonfinite_rows(batch: Batch) -> np.ndarray:
        bad = ~np.isfinite(batch.columns["pre_norm"].values)
        flagged = batch.columns.get("nonfinite")
        if flagged is not None:
            bad |= flagged.values == 1.0
        return bad

    def _derived_events(self, run_id: int, batch: Batch, new_mask: np.ndarray) -> list[tuple]:
        """spike and nonfinite events of the newly stored rows, in that order (each by row), as
        `_event_row` tuples; built column-wise. Clip events are not stored (see `events`)."""
        pre = batch.columns["pre_norm"].values
        threshold = batch.columns.get("threshold")
        times = batch.columns.get("time")
        z = batch.columns.get("z")
        rows: list[tuple] = []

        def add(indices: np.ndarray, kind: str, messages) -> None:
            if not len(indices):
                return
            values = pre[indices]
            value_nan = np.isnan(values)
            mask = value_nan.astype(np.int64)
            value_list = values.tolist()
            if threshold is not None:
                limits = threshold.values[indices]
                limit_nan = np.isnan(limits)
                limit_list = limits.tolist()
                absent = threshold.missing[indices] if threshold.missing is not None else None
                # a NaN threshold sets bit 2; a missing one is a plain NULL
                mask |= (limit_nan if absent is None else limit_nan & ~absent).astype(np.int64) * 2
                for index in np.flatnonzero(limit_nan).tolist():
                    limit_list[index] = None
            else:
                limit_list = [None] * len(indices)
            if times is not None:
                stamps = times.values[indices]
                time_list = stamps.tolist()
                for index in np.flatnonzero(np.isnan(stamps)).tolist():
                    time_list[index] = None
            else:
                time_list = [None] * len(indices)
            for index in np.flatnonzero(value_nan).tolist():
                value_list[index] = None
            rows.extend(zip(repeat(run_id), batch.steps[indices].tolist(), repeat(kind), value_list,
                            limit_list, mask.tolist(), messages(indices), repeat(None), time_list))

        def norms(indices: np.ndarray) -> list:
            return encode_floats(pre[indices])

        spike = batch.columns.get("spike")
        if spike is not None:
            def spike_messages(indices: np.ndarray) -> list[str]:
                scores = z.values[indices].tolist() if z is not None else [math.nan] * len(indices)
                return [f"gradient-norm spike: pre-clip norm {norm}"
                        + (f" (z = {score:.3g})" if math.isfinite(score) else "")
                        for norm, score in zip(norms(indices), scores)]
            add(np.flatnonzero((spike.values == 1.0) & new_mask), "spike", spike_messages)
        add(np.flatnonzero(self._nonfinite_rows(batch) & new_mask), "nonfinite",
            lambda indices: [f"non-finite gradient: pre-clip norm {norm}" for norm in norms(indices)])
        return rows

    def _store_tensor_norms(self, cursor, run_id: int, version: int, batch: Batch, new_mask: np.ndarray) -> None:
        """Add the stored steps' tensor norms to their tensor chunks. A step's tensor row follows
        the step (a duplicate or conflicting step adds none), so these rows are new to their
        chunk: they go in as its next segment, without reading it, until it has MAX_SEGMENTS;
        then the chunk is read, joined and rewritten as one segment."""
        norms = np.asarray(batch.tensor_norms, dtype=np.float32)
        rows = np.flatnonzero(new_mask)
        steps = batch.steps[rows]
        by_chunk = split_by_chunk(steps)
        segments = self.rows.tensor_segments(cursor, run_id, [chunk_id for chunk_id, _ in by_chunk])
        full = [chunk_id for chunk_id, _ in by_chunk if segments.get(chunk_id, 0) >= MAX_SEGMENTS]
        loaded = self.rows.load_tensors(cursor, run_id, full) if full else {}
        parts = []
        for chunk_id, picked in by_chunk:
            old = loaded.get(chunk_id)
            merged = merge_tensors(old, chunk_id, steps[picked], batch.tensor_names, norms[rows[picked]])
            parts.append((0 if old is not None else segments.get(chunk_id, 0), merged))
        self.rows.write_tensors(cursor, run_id, version, parts)
