"""`Store`: the database of one server process: ingest, reads, the run cache, delete.

Routes get it as a FastAPI dependency (`routes.deps.get_store`) and call these;
everything here works without HTTP.
"""
from __future__ import annotations

from sqlalchemy import Engine

from gradwatch.server.storage.cache import RunArrays, RunCache
from gradwatch.server.storage.engine import Database, rollback_quietly
from gradwatch.server.storage.ingest import IngestResult, Ingestor
from gradwatch.server.storage.reads import Reader, UnknownRun
from gradwatch.server.storage.registry import VALUE_COLUMNS


class Store(Database):
    """Ingest (`ingest`), reads (`list_runs`, `events`, ...), `cache`, and `delete_run`."""

    def __init__(self, engine: Engine, cache_mb: float = 128):
        super().__init__(engine)
        self._run_ids: dict[str, int] = {}
        self.ingestor = Ingestor(engine, self._run_ids)
        self.reader = Reader(engine, self._run_ids)
        self.cache = RunCache(self.reader, max_bytes=int(cache_mb * (1 << 20)))

    @property
    def checkpointer(self):
        return self.ingestor.checkpointer

    def ingest(self, run: str, batch, meta: dict | None = None, events: list[dict] | None = None) -> IngestResult:
        """Store one batch in one transaction; returns counts once it is committed."""
        return self.ingestor.ingest(run, batch, meta=meta, events=events)

    def run_id(self, name: str) -> int:
        return self.reader.run_id(name)

    def list_runs(self, meta: bool = True) -> list[dict]:
        """Every run's counters, with `meta` as an orjson Fragment of the stored JSON unless
        `meta=False` (see `Reader.list_runs`)."""
        return self.reader.list_runs(meta)

    def meta_of(self, name: str) -> dict:
        """A run's stored meta as a dict; UnknownRun when there is no such run."""
        return self.reader.meta_of(self.run_id(name))

    def fetch_steps(self, run_id: int, after: int = -1, lo: int | None = None, hi: int | None = None,
                    newest: int | None = None):
        return self.reader.fetch_steps(run_id, after=after, lo=lo, hi=hi, newest=newest)

    def events(self, run_id: int, kind: str | None, limit: int) -> list[dict]:
        return self.reader.events(run_id, kind, limit)

    def tensor_norms(self, run_id: int, start: int | None, end: int | None, points: int):
        return self.reader.tensor_norms(run_id, start, end, points)

    def overview(self, run_id: int, start: int | None, end: int | None, points: int, fields: tuple[str, ...]):
        return self.reader.overview(run_id, start, end, points, fields, cache=self.cache)

    def arrays(self, run: str, fields=VALUE_COLUMNS) -> RunArrays:
        """A run's columns from the cache; UnknownRun when there is no such run."""
        try:
            return self.cache.get(self.run_id(run), fields)
        except UnknownRun:  # deleted meanwhile
            raise UnknownRun(run) from None

    def delete_run(self, name: str) -> dict[str, int]:
        """Remove a run: its chunks, tensor chunks, events, and cached arrays.

        One transaction (under the ingest write lock on SQLite, so no batch of
        this process is half-way); returns the rows removed per table.
        UnknownRun when there is no such run.
        """
        lock = self.ingestor._write_lock
        if lock is not None:
            with lock:
                removed = self._delete_once(name)
        else:
            removed = self._delete_once(name)
        return removed

    def _delete_once(self, name: str) -> dict[str, int]:
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                self._begin(cursor, write=True)
                cursor.execute(self._sql("SELECT id FROM runs WHERE name = ?"), (name,))
                row = cursor.fetchone()
                if row is None:
                    raise UnknownRun(name)
                run_id = row[0]
                removed = self.ingestor.rows.delete_run(cursor, run_id)
                cursor.execute(self._sql("DELETE FROM events WHERE run_id = ?"), (run_id,))
                removed["events"] = max(cursor.rowcount or 0, 0)
                cursor.execute(self._sql("DELETE FROM runs WHERE id = ?"), (run_id,))
                if self.is_sqlite:
                    cursor.execute("COMMIT")
                else:
                    raw.commit()
            except BaseException:
                rollback_quietly(raw, self.is_sqlite)
                raise
        finally:
            raw.close()
        self._run_ids.pop(name, None)
        self.cache.forget(run_id)
        return removed
