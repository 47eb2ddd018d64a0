"""SQLite WAL checkpoints on a background thread, off the ingest path."""
from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import Engine

log = logging.getLogger("gradwatch.server")


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

    A checkpoint starts at most every `COALESCE_S` (0.3 s): the commits of that
    time share it. A page that several batches rewrite (a segment's summary, the
    B-tree leaves a run's rows go to, the `runs` row) is then copied into the
    database file once, not once per batch: the checkpoints' CPU per 2,000-step
    batch went from 0.87 to 0.22 ms at 0.1 s (`benchmarks/ingest_profile.py`,
    process CPU minus the ingesting thread's). 0.3 s measured a further 2-9% over
    0.1 s in runs under a second long, which can leave a checkpoint after the
    timed window; over 4 s runs (1,000,000 steps) 1.0 s gained only 2% more on
    0.3 s, within the noise (`benchmarks/ingest_bench.py --against`, alternated).
    The WAL holds at most that much more: ~0.3 s of ingest, about 30 MB at full
    speed, under `LIMIT`.
    """

    LIMIT = 4096   # frames (pages): 64 MB of WAL at 16 KiB pages (engine.SQLITE_PAGE_SIZE)
    IDLE_S = 30.0
    COALESCE_S = 0.3

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
            time.sleep(self.COALESCE_S)   # the commits of the next COALESCE_S share this checkpoint
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

