"""Reads: runs, a run's steps, events (stored ones merged with clips), tensor norms."""
from __future__ import annotations

import json
import math
import time

import numpy as np
from sqlalchemy import Engine

from gradwatch.server.storage.cache import arrays_from_rows
from gradwatch.server.storage.engine import Database
from gradwatch.server.storage.registry import COLUMNS, NAN_BITS
from gradwatch.server.storage.serialise import encode_float
from gradwatch.server.storage.tables import CLIPPED_INDEX, CLIPPED_WHERE

STEP_COLUMNS = ", ".join(COLUMNS)


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

    def run_id(self, name: str) -> int:
        """The run's id, read each time (one indexed row): another process may have deleted
        the run, and SQLite may give a new run of the same name the same id."""
        rows = self.read("SELECT id FROM runs WHERE name = ?", (name,))
        if not rows:
            raise UnknownRun(name)
        return rows[0][0]

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

    def run_counters(self, run_id: int) -> tuple[int, int | None, float]:
        """(stored steps, last step, when created); UnknownRun(run_id) once it is deleted."""
        rows = self.read("SELECT steps, last_step, created FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise UnknownRun(run_id)
        return rows[0][0], rows[0][1], rows[0][2]

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
        return merge_newest_first(stored, self.clip_events(run_id, limit), not self.is_postgres)[:limit]

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

    def tensor_layouts(self, run_id: int) -> tuple[list[str], dict[int, np.ndarray]]:
        """Every tensor name of a run in first-seen order, and for each stored layout the
        positions of its names in that list (a step's blob holds its layout's names in order)."""
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
        return names, columns

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
        names, columns = self.tensor_layouts(run_id)
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
