"""Database functions: ingest a validated batch, read runs, series, events, tensors.

Routes stay thin and call these; everything here works without HTTP.

Ingest is one transaction per batch on a raw DBAPI connection; steps go in as
multi-row `INSERT ... VALUES (...), (...)` statements of up to 2,000 rows
(about twice as fast as executemany in sqlite3; see `_insert_steps`). SQLite takes the write lock up
front (`BEGIN IMMEDIATE`), so the set of steps already stored, read at the
start, cannot change before the insert. PostgreSQL inserts with `ON CONFLICT
DO NOTHING`; if another process stored some of the same steps in between
(the rowcount says so), the transaction is rolled back and replayed once.
Re-sent rows are compared with the stored ones: equal is a duplicate,
different is a conflict (stored as a `conflict` event), never an overwrite.
Clip events are not stored: `events` reads them from the clipped steps.

Reads of a run's columns go through `RunCache`: numpy arrays of the run's
steps, refreshed by reading only the rows past the cached last step when the
run's row count says that is all that changed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from itertools import compress, groupby, repeat
from typing import Any, Iterator

import numpy as np
import orjson
from sqlalchemy import Engine

from gradwatch.server.db import CLIPPED_INDEX, CLIPPED_WHERE, rollback_quietly
from gradwatch.server.schemas import (BOOL_FIELDS, COLUMNS, FLOAT_FIELDS, NAN_BITS, VALUE_COLUMNS,
                                      Batch, encode_bools, encode_float, encode_floats)

STEP_COLUMNS = ", ".join(COLUMNS)
LIVE_CHANNEL = "gradwatch_live"
PROCESS_TOKEN = f"{os.getpid()}-{os.urandom(4).hex()}"
log = logging.getLogger("gradwatch.server")
INGEST_CONFIGURED = "gradwatch_ingest_configured"  # key in a pooled connection's .info
INSERT_CHUNK = 2000  # 2,000 rows x 15 values stays under SQLite's 32,766 bound parameters


class UnknownRun(LookupError):
    pass


class IngestRace(RuntimeError):
    """Another process stored some of this batch's steps during our transaction."""


@dataclass
class IngestResult:
    run: str
    accepted: int
    duplicates: int
    conflicts: int
    new_mask: np.ndarray | None = None   # which rows of the batch were stored now

    def answer(self) -> dict[str, int]:
        return {"accepted": self.accepted, "duplicates": self.duplicates, "conflicts": self.conflicts}


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


def now() -> float:
    return time.time()


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp % 1 * 1000):03d}Z"


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


class WalCheckpointer:
    """SQLite WAL checkpoints on a background thread, off the ingest path.

    By default SQLite checkpoints inside the COMMIT that takes the WAL past
    1,000 pages: every ~18th batch of 2,000 steps waited for ~4 MB copied into
    the database file and two fsyncs (about 1.6 ms per batch on average on the
    2-core benchmark machine; moving it here raised `benchmarks/ingest_bench.py`
    by ~20% there, the checkpoint overlapping the HTTP round trip). Ingest connections turn that off
    (`wal_autocheckpoint=0`) and, after each commit, wake this thread, which
    runs a PASSIVE checkpoint on its own connection: it never takes the write
    lock, so the next batch is received, decoded and validated meanwhile, and
    writers are not blocked. Durability is unchanged (the same WAL frames are
    written and committed the same way; a crash during a checkpoint is
    recovered as SQLite always does). Should the WAL still grow past `LIMIT`
    frames (writers always beginning before a checkpoint ends, so it never
    restarts), one checkpoint runs under the ingest write lock, after which the
    next write restarts the WAL from its start.
    The thread exits after `IDLE_S` without commits and is started again on
    the next one.
    """

    LIMIT = 4096   # frames (pages): 16 MB of WAL at SQLite's default page size
    IDLE_S = 30.0

    def __init__(self, engine: Engine, write_lock: threading.Lock | None):
        self.engine = engine
        self.write_lock = write_lock
        self.checkpoints = 0
        self._wanted = threading.Event()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        """Ask for a checkpoint soon (called after each ingest commit); never waits for one."""
        with self._guard:  # the idle thread decides to exit under the same lock
            self._wanted.set()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gradwatch-wal-checkpoint",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            if not self._wanted.wait(self.IDLE_S):
                with self._guard:
                    if not self._wanted.is_set():
                        self._thread = None
                        return
                continue
            self._wanted.clear()
            try:
                self.checkpoint()
            except Exception as error:  # the database may be gone or broken; ingest reports that
                log.warning("WAL checkpoint failed: %s", error)
                time.sleep(1.0)

    def checkpoint(self) -> tuple[int, int, int]:
        """One PASSIVE checkpoint; (busy, frames in the WAL, frames checkpointed)."""
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
            busy, frames, done = cursor.fetchone()
            if frames > self.LIMIT and self.write_lock is not None:
                # The WAL restarts from its start only at a write that begins once it is fully
                # copied back; under a steady stream each checkpoint may finish just after the
                # next write began. One checkpoint with no write running ends that.
                with self.write_lock:
                    cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    busy, frames, done = cursor.fetchone()
            cursor.close()
            self.checkpoints += 1
            return busy, frames, done
        finally:
            raw.close()


class Store:
    """All database access of one server process."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.dialect = engine.dialect.name
        self.is_sqlite = self.dialect == "sqlite"
        self.is_postgres = self.dialect == "postgresql"
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self._run_ids: dict[str, int] = {}
        self._insert_sql: dict[tuple[int, tuple[str, ...]], str] = {}
        self.cache = RunCache(self)
        self.checkpointer: WalCheckpointer | None = None
        if self.is_sqlite and str(self.read("PRAGMA journal_mode")[0][0]).lower() == "wal":
            self.checkpointer = WalCheckpointer(engine, self._write_lock)

    # ----- raw connections -----

    def _sql(self, statement: str) -> str:
        return statement if self.is_sqlite else statement.replace("?", "%s")

    def _begin(self, cursor, write: bool) -> None:
        if self.is_sqlite:
            cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def read(self, statement: str, params: tuple = ()) -> list[tuple]:
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute(self._sql(statement), params)
            rows = cursor.fetchall()
            cursor.close()
            if not self.is_sqlite:
                raw.rollback()
            return rows
        finally:
            raw.close()

    # ----- runs -----

    def run_id(self, name: str) -> int:
        cached = self._run_ids.get(name)
        if cached is not None:
            return cached
        rows = self.read("SELECT id FROM runs WHERE name = ?", (name,))
        if not rows:
            raise UnknownRun(name)
        self._run_ids[name] = rows[0][0]
        return rows[0][0]

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

    def list_runs(self) -> list[dict]:
        """Every run with its counters; `clip_rate` as `/stats` has it for the whole run:
        clipped steps over the steps that carry a clipped flag, None when none does."""
        rows = self.read("SELECT name, steps, first_step, last_step, created, updated, clips, clip_flags, "
                         "spikes, nonfinite, meta FROM runs ORDER BY updated DESC")
        out = []
        for name, steps, first, last, created, updated, clips, flags, spikes, nonfinite, meta in rows:
            out.append({"name": name, "steps": steps, "first_step": first, "last_step": last,
                        "created": iso(created), "updated": iso(updated),
                        "clip_rate": clips / flags if flags else None, "clips": clips,
                        "spikes": spikes, "nonfinite": nonfinite, "meta": json.loads(meta or "{}")})
        return out

    # ----- ingest -----

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
                return result
            except BaseException:
                rollback_quietly(raw, self.is_sqlite)
                raise
        finally:
            raw.close()

    def _ingest_in_transaction(self, cursor, run: str, batch: Batch | None, meta: dict | None,
                               events: list[dict] | None) -> IngestResult:
        run_id, last_stored = self._ensure_run(cursor, run)
        self._run_ids[run] = run_id
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
        if accepted and self.is_postgres:
            payload = json.dumps({"origin": PROCESS_TOKEN, "run": run, "run_id": run_id,
                                  "lo": first, "hi": last})
            cursor.execute("SELECT pg_notify(%s, %s)", (LIVE_CHANNEL, payload))
        return IngestResult(run=run, accepted=accepted, duplicates=duplicates, conflicts=conflicts,
                            new_mask=new_mask)

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

    # ----- reads -----

    def run_counters(self, run_id: int) -> tuple[int, int | None]:
        rows = self.read("SELECT steps, last_step FROM runs WHERE id = ?", (run_id,))
        return rows[0][0], rows[0][1]

    def fetch_steps(self, run_id: int, after: int = -1, lo: int | None = None,
                    hi: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray | None]]:
        """Rows of a run with step > after (or in [lo, hi]) as arrays, ordered by step."""
        if lo is not None:
            where, params = "run_id = ? AND step BETWEEN ? AND ?", (run_id, lo, hi)
        else:
            where, params = "run_id = ? AND step > ?", (run_id, after)
        rows = self.read(f"SELECT {STEP_COLUMNS}, nan_mask FROM steps WHERE {where} ORDER BY step", params)
        return arrays_from_rows(rows)

    def fetch_steps_counted(self, run_id: int, columns: tuple[str, ...], after: int = -1,
                            upto: int | None = None) -> tuple[int, tuple]:
        """Rows with after < step (<= upto) and the run's stored row count, in one statement.

        Only `columns` (value columns) are read. One statement sees one snapshot
        (SQLite and PostgreSQL alike), so the count and the rows agree even
        while other transactions commit.
        """
        selected = ", ".join(f"s.{name}" for name in ("step",) + columns)
        bound = "" if upto is None else " AND s.step <= ?"
        params = (after,) + (() if upto is None else (upto,)) + (run_id,)
        rows = self.read(f"SELECT r.steps, {selected}, s.nan_mask FROM runs r LEFT JOIN steps s "
                         f"ON s.run_id = r.id AND s.step > ?{bound} WHERE r.id = ? ORDER BY s.step", params)
        count = rows[0][0] if rows else 0
        body = [row[1:] for row in rows if row[1] is not None]
        return count, arrays_from_rows(body, columns)

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
        clips = self.clip_events(run_id, limit)
        if not clips:
            return stored
        out: list[dict] = []
        pending = 0
        nulls_last = not self.is_postgres
        for item in stored:
            step = item["step"]
            while pending < len(clips) and (step is None and nulls_last or
                                            step is not None and clips[pending]["step"] > step):
                out.append(clips[pending])
                pending += 1
            out.append(item)
        out.extend(clips[pending:])
        return out[:limit]

    def clip_events(self, run_id: int, limit: int) -> list[dict]:
        """The newest `limit` clipped steps as clip events, newest first."""
        where = CLIPPED_WHERE[self.dialect] if self.dialect in CLIPPED_WHERE else "clipped"
        hint = f" INDEXED BY {CLIPPED_INDEX}" if self.is_sqlite else ""  # SQLite would walk the whole run
        rows = self.read(f"SELECT step, pre_norm, threshold, nan_mask, time FROM steps{hint} "
                         f"WHERE run_id = ? AND {where} ORDER BY step DESC LIMIT ?", (run_id, limit))
        threshold_nan = NAN_BITS["threshold"]
        out = []
        for step, value, threshold, mask, stamp in rows:
            value = encode_float(math.nan if value is None else value)  # pre_norm is NULL only for a NaN
            if threshold is None and mask & threshold_nan:
                threshold = math.nan
            out.append({"step": step, "kind": "clip", "value": value, "threshold": encode_float(threshold),
                        "message": f"pre-clip norm {value} clipped", "time": stamp})
        return out

    def tensor_norms(self, run_id: int, start: int | None, end: int | None,
                     points: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(names, steps, norms[steps, names], absent[steps, names]) over a step range,
        at most `points` steps; `absent` marks tensors a step (bucket) did not report.

        Past `points` steps, consecutive steps are grouped into equal buckets and
        each tensor keeps its largest norm in the bucket (a NaN wins: it is the
        thing to see); a bucket is labelled by its first step. Rows are read in
        chunks, so a long run never sits in memory whole.
        """
        lo = start if start is not None else 0
        hi = end if end is not None else 2**62
        layouts = {row[0]: json.loads(row[1]) for row in
                   self.read("SELECT id, names FROM tensor_layouts WHERE run_id = ?", (run_id,))}
        names: list[str] = []
        index: dict[str, int] = {}
        for layout in layouts.values():
            for name in layout:
                if name not in index:
                    index[name] = len(names)
                    names.append(name)
        columns = {layout_id: np.array([index[n] for n in layout], dtype=np.intp)
                   for layout_id, layout in layouts.items()}
        total = self.read("SELECT COUNT(*) FROM tensor_norms WHERE run_id = ? AND step BETWEEN ? AND ?",
                          (run_id, lo, hi))[0][0]
        size = max(-(-total // points), 1) if total else 1
        buckets = -(-total // size) if total else 0
        out = np.full((buckets, len(names)), -np.inf, dtype=np.float32)
        has_nan = np.zeros((buckets, len(names)), dtype=bool)
        seen = np.zeros((buckets, len(names)), dtype=bool)
        labels = np.zeros(buckets, dtype=np.int64)
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute(self._sql("SELECT step, layout_id, norms FROM tensor_norms WHERE run_id = ? "
                                     "AND step BETWEEN ? AND ? ORDER BY step"), (run_id, lo, hi))
            position = 0
            while position < total:
                rows = cursor.fetchmany(20_000)[:total - position]
                if not rows:
                    break
                chunk_positions = np.arange(position, position + len(rows))
                chunk_buckets = chunk_positions // size
                starts_here = chunk_positions % size == 0
                labels[chunk_buckets[starts_here]] = [row[0] for row, first in zip(rows, starts_here) if first]
                layout_ids = np.array([row[1] for row in rows])
                for layout_id in np.unique(layout_ids).tolist():
                    picked = np.flatnonzero(layout_ids == layout_id)
                    target = columns[layout_id]
                    block = np.frombuffer(b"".join(rows[i][2] for i in picked.tolist()), dtype="<f4")
                    block = block.reshape(len(picked), len(target))
                    ids = chunk_buckets[picked]
                    cuts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
                    nan = np.isnan(block)
                    highest = np.maximum.reduceat(np.where(nan, -np.inf, block), cuts, axis=0)
                    any_nan = np.logical_or.reduceat(nan, cuts, axis=0)
                    rows_at = ids[cuts][:, None]
                    out[rows_at, target] = np.maximum(out[rows_at, target], highest)
                    has_nan[rows_at, target] |= any_nan
                    seen[rows_at, target] = True
                position += len(rows)
            cursor.close()
            if not self.is_sqlite:
                raw.rollback()
        finally:
            raw.close()
        out[has_nan | ~seen] = np.nan
        return names, labels, out, ~seen


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

    def __init__(self, store: Store, max_runs: int = 4):
        self.store = store
        self.max_runs = max_runs
        self._runs: OrderedDict[int, RunArrays] = OrderedDict()
        self._locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, run_id: int, fields: tuple[str, ...] | set[str] = VALUE_COLUMNS) -> RunArrays:
        wanted = {name for name in fields if name != "step"}
        count, _ = self.store.run_counters(run_id)
        with self._lock:
            run_lock = self._locks.setdefault(run_id, threading.Lock())
            current = self._runs.get(run_id)
        if current is not None and current.count == count and wanted <= current.values.keys():
            return current
        with run_lock:
            current = self._runs.get(run_id)
            if current is not None and current.count >= count and wanted <= current.values.keys():
                return current
            fresh = self._refresh(run_id, current, wanted) if current is not None else None
            if fresh is None:
                columns = _ordered_columns(wanted | (set(current.values) if current is not None else set()))
                _, (steps, values, missing) = self.store.fetch_steps_counted(run_id, columns)
                fresh = RunArrays(count=len(steps), steps=steps, values=values, missing=missing)
            with self._lock:
                self._runs[run_id] = fresh
                self._runs.move_to_end(run_id)
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


def _ordered_columns(names: set[str]) -> tuple[str, ...]:
    return tuple(name for name in VALUE_COLUMNS if name in names)


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


def encode_series(steps: np.ndarray, values: dict[str, np.ndarray], missing: dict[str, np.ndarray | None],
                  fields: tuple[str, ...]) -> dict[str, list]:
    """Columnar JSON-ready series: non-finite floats as strings, missing as null."""
    out: dict[str, list] = {"step": steps.tolist()}
    for name in fields:
        if name == "step":
            continue
        if name in BOOL_FIELDS:
            out[name] = encode_bools(values[name])
        else:
            out[name] = encode_floats(values[name], missing[name])
    return out


def csv_lines(arrays: RunArrays, chunk: int = 10_000) -> Iterator[str]:
    """Every step as CSV: NaN/Infinity spelled as on the wire, missing values empty."""
    yield ",".join(COLUMNS) + "\n"
    for begin in range(0, len(arrays.steps), chunk):
        stop = begin + chunk
        part = encode_series(arrays.steps[begin:stop],
                             {k: v[begin:stop] for k, v in arrays.values.items()},
                             {k: (m[begin:stop] if m is not None else None) for k, m in arrays.missing.items()},
                             VALUE_COLUMNS)
        columns = [part[name] for name in COLUMNS]
        lines = []
        for row in zip(*columns):
            lines.append(",".join("" if item is None else ("true" if item is True else "false" if item is False
                                                           else repr(item) if isinstance(item, float)
                                                           else str(item)) for item in row))
        yield "\n".join(lines) + "\n"
