"""Ingest: store one validated batch (and events, meta) in one transaction.

One transaction per batch on a raw DBAPI connection; steps go in as
multi-row `INSERT ... VALUES (...), (...)` statements of up to 2,000 rows
(about twice as fast as executemany in sqlite3; see `_insert_steps`). SQLite takes the write lock up
front (`BEGIN IMMEDIATE`), so the set of steps already stored, read at the
start, cannot change before the insert. PostgreSQL inserts with `ON CONFLICT
DO NOTHING`; if another process stored some of the same steps in between
(the rowcount says so), the transaction is rolled back and replayed once.
Re-sent rows are compared with the stored ones: equal is a duplicate,
different is a conflict (stored as a `conflict` event), never an overwrite.
Clip events are not stored: reads derive them from the clipped steps.

Whoever wants to know of newly stored rows (the live feed) registers a
callback in `Ingestor.on_stored`; it is called inside the transaction with
the cursor (so a PostgreSQL NOTIFY is delivered only if the batch commits).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from itertools import compress, groupby, repeat
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import orjson
from sqlalchemy import Engine

from gradwatch.server.storage.engine import Database, rollback_quietly
from gradwatch.server.storage.registry import BOOL_FIELDS, COLUMNS, NAN_BITS, VALUE_COLUMNS
from gradwatch.server.storage.serialise import encode_bools, encode_floats
from gradwatch.server.storage.wal import WalCheckpointer

if TYPE_CHECKING:
    from gradwatch.server.schemas import Batch

STEP_COLUMNS = ", ".join(COLUMNS)
INGEST_CONFIGURED = "gradwatch_ingest_configured"  # key in a pooled connection's .info
INSERT_CHUNK = 2000  # 2,000 rows x 16 values stays under SQLite's 32,766 bound parameters


class IngestRace(RuntimeError):
    """Another process stored some of this batch's steps during our transaction."""


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


def _column_lists(batch: Batch, sqlite: bool = False) -> tuple[list[list], np.ndarray]:
    """The batch as per-column Python lists ready to bind, and each row's nan_mask.

    A column that was not sent is `[None] * n` (callers leave it out of the
    INSERT; the lists serve the duplicate comparison). For SQLite (REAL
    affinity stores ints as floats) a float column that arrived as plain JSON
    numbers is bound from the decoded list itself: JSON has no NaN, so there is
    nothing to encode; and booleans are bound as the ints 0/1, which is what
    SQLite stores for them anyway: Python's sqlite3 sends every `bool` (and
    `None`) through its adapter lookup, about 0.8 us each, where an int or a
    float binds directly (6,000 flags per 2,000-step batch were ~5 ms).
    """
    n = len(batch)
    nan_mask = np.zeros(n, dtype=np.int64)
    lists: list[list] = []
    for name in VALUE_COLUMNS:
        column = batch.columns.get(name)
        if column is None:
            lists.append([None] * n)
            continue
        values = column.values
        if name in BOOL_FIELDS:
            if not sqlite:
                lists.append(encode_bools(values) if column.missing is not None else (values == 1.0).tolist())
            elif column.missing is None:
                lists.append((values == 1.0).view(np.int8).tolist())
            else:
                items = (values == 1.0).view(np.int8).tolist()
                for index in np.flatnonzero(column.missing).tolist():
                    items[index] = None
                lists.append(items)
            continue
        if sqlite and column.raw is not None:
            lists.append(column.raw)
            continue
        items = values.tolist()
        nans = np.isnan(values)
        if nans.any():
            if column.missing is not None:
                nan_mask |= (nans & ~column.missing).astype(np.int64) * NAN_BITS[name]
            else:
                nan_mask |= nans.astype(np.int64) * NAN_BITS[name]
            for index in np.flatnonzero(nans).tolist():
                items[index] = None
        lists.append(items)
    return lists, nan_mask



class Ingestor(Database):
    """The write path of one server process."""

    def __init__(self, engine: Engine, run_ids: dict[str, int]):
        super().__init__(engine)
        self._run_ids = run_ids
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self._insert_sql: dict[tuple[int, tuple[str, ...]], str] = {}
        self.on_stored: list[Callable[[Any, StoredRows], None]] = []
        self.after_commit: list[Callable[[str, Batch, IngestResult], None]] = []  # committed; must not block
        self.checkpointer: WalCheckpointer | None = None
        if self.is_sqlite and str(self.read("PRAGMA journal_mode")[0][0]).lower() == "wal":
            self.checkpointer = WalCheckpointer(engine, self._write_lock)

    def _ensure_run(self, cursor, name: str) -> tuple[int, int | None]:
        """The run's id (creating the run) and its last stored step."""
        cursor.execute(self._sql("SELECT id, last_step FROM runs WHERE name = ?"), (name,))
        row = cursor.fetchone()
        if row:
            return row[0], row[1]
        stamp = now()
        cursor.execute(self._sql("INSERT INTO runs (name, created, updated, meta, steps, clips, clip_flags, "
                                 "spikes, nonfinite, version) VALUES (?, ?, ?, '{}', 0, 0, 0, 0, 0, 0) "
                                 "ON CONFLICT (name) DO NOTHING"), (name, stamp, stamp))
        cursor.execute(self._sql("SELECT id, last_step FROM runs WHERE name = ?"), (name,))
        row = cursor.fetchone()
        return row[0], row[1]


    def ingest(self, run: str, batch: Batch | None, meta: dict | None = None,
               events: list[dict] | None = None) -> IngestResult:
        """Store one batch in one transaction; returns counts once it is committed."""
        for attempt in range(3):
            try:
                if self._write_lock is not None:
                    with self._write_lock:
                        return self._ingest_once(run, batch, meta, events)
                return self._ingest_once(run, batch, meta, events)
            except IngestRace:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

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
        run_id, last_stored = self._ensure_run(cursor, run)
        stamp = now()
        accepted = duplicates = conflicts = 0
        new_mask = None
        event_rows: list[tuple] = []
        counts = {"steps": 0, "clips": 0, "clip_flags": 0, "spikes": 0, "nonfinite": 0}
        first = last = None
        if batch is not None and len(batch):
            lists, nan_mask = _column_lists(batch, sqlite=self.is_sqlite)
            steps = batch.steps
            step_list = steps.tolist()
            lo, hi = int(steps.min()), int(steps.max())
            stored: dict[int, tuple] = {}
            if last_stored is not None and lo <= last_stored:  # appends past the last step skip this
                cursor.execute(self._sql(f"SELECT {STEP_COLUMNS}, nan_mask FROM steps "
                                         "WHERE run_id = ? AND step BETWEEN ? AND ?"), (run_id, lo, hi))
                stored = {row[0]: row for row in cursor.fetchall()}
            columns = [step_list, *lists, nan_mask.tolist()]
            if stored:
                new_mask = np.fromiter((step not in stored for step in step_list), dtype=bool, count=len(steps))
                keep = new_mask.tolist()
                new_columns = [list(compress(column, keep)) for column in columns]
            else:
                new_mask = np.ones(len(steps), dtype=bool)
                new_columns = columns
            accepted = len(new_columns[0])
            if accepted:
                sent = ("step",) + tuple(name for name in VALUE_COLUMNS if name in batch.columns) + ("nan_mask",)
                self._insert_steps(cursor, run_id, sent,
                                   [column for name, column in zip(COLUMNS + ("nan_mask",), new_columns)
                                    if name in sent], run)
            rows = [tuple(column[i] for column in columns) for i in np.flatnonzero(~new_mask).tolist()]
            for row in rows:
                old = stored[row[0]]
                differing = [name for name, a, b in zip(COLUMNS[1:] + ("nan_mask",), row[1:], old[1:])
                             if not (a == b or (a is None and b is None))]
                if not differing:
                    duplicates += 1
                    continue
                conflicts += 1
                event_rows.append(_event_row(
                    run_id, row[0], "conflict", None, None,
                    f"step {row[0]} was sent again with different values ({', '.join(differing)}); "
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
                    self._store_tensor_norms(cursor, run_id, batch, new_mask)
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
        meta_text = None
        if meta:
            cursor.execute(self._sql("SELECT meta FROM runs WHERE id = ?"), (run_id,))
            merged = json.loads(cursor.fetchone()[0] or "{}")
            merged.update(meta)
            meta_text = orjson.dumps(merged).decode()
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

    def _insert_steps(self, cursor, run_id: int, names: tuple[str, ...], columns: list[list], run: str) -> None:
        """Multi-row `INSERT ... VALUES (...), (...)` in chunks: about twice as fast as executemany
        in sqlite3 (one statement step per chunk instead of per row); fine in psycopg too.
        Only the columns sent are named (the others are NULL): binding None costs sqlite3
        an adapter lookup per value."""
        width = len(columns) + 1
        total = len(columns[0])
        for begin in range(0, total, INSERT_CHUNK):
            size = min(INSERT_CHUNK, total - begin)
            statement = self._insert_sql.get((size, names))
            if statement is None:
                one = "(" + ", ".join(["?"] * width) + ")"
                statement = self._sql(f"INSERT INTO steps (run_id, {', '.join(names)}) VALUES "
                                      + ", ".join([one] * size) + " ON CONFLICT DO NOTHING")
                if len(self._insert_sql) < 64:
                    self._insert_sql[(size, names)] = statement
            # Row-major parameters by strided slice assignment: about 3x cheaper than
            # flattening zip(*columns) through chain.
            params = [run_id] * (size * width)
            for position, column in enumerate(columns, start=1):
                params[position::width] = column if size == total else column[begin:begin + size]
            cursor.execute(statement, params)
            if cursor.rowcount is not None and 0 <= cursor.rowcount < size:
                raise IngestRace(run)

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

    def _store_tensor_norms(self, cursor, run_id: int, batch: Batch, new_mask: np.ndarray) -> None:
        names_text = orjson.dumps(batch.tensor_names).decode()
        digest = hashlib.sha256(names_text.encode()).hexdigest()
        cursor.execute(self._sql("SELECT id FROM tensor_layouts WHERE run_id = ? AND digest = ?"),
                       (run_id, digest))
        row = cursor.fetchone()
        if row is None:
            cursor.execute(self._sql("INSERT INTO tensor_layouts (run_id, digest, names) VALUES (?, ?, ?) "
                                     "ON CONFLICT DO NOTHING"), (run_id, digest, names_text))
            cursor.execute(self._sql("SELECT id FROM tensor_layouts WHERE run_id = ? AND digest = ?"),
                           (run_id, digest))
            row = cursor.fetchone()
        layout_id = row[0]
        norms = np.ascontiguousarray(batch.tensor_norms, dtype="<f4")
        rows = [(run_id, int(batch.steps[i]), layout_id, norms[i].tobytes())
                for i in np.flatnonzero(new_mask).tolist()]
        cursor.executemany(self._sql("INSERT INTO tensor_norms (run_id, step, layout_id, norms) "
                                     "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"), rows)
