"""Crash consistency (kill -9 in the middle of a batch) and database failures (503)."""
from __future__ import annotations

import sqlite3
import threading
import time

import httpx
import msgpack
import numpy as np
import pytest

from tests.test_server_support import make_batch, post, start_server

MSGPACK = {"Content-Type": "application/msgpack"}


def msgpack_body(batch: dict) -> bytes:
    """The batch as the agent sends it: each column a typed little-endian array (docs/wire.md)."""
    def typed(array: np.ndarray) -> msgpack.ExtType:
        return msgpack.ExtType(1, array.dtype.str.encode().ljust(8, b"\0") + array.tobytes())
    columns = {}
    for name, values in batch.items():
        dtype = "<i8" if name == "step" else "|b1" if isinstance(values[0], bool) else "<f8"
        columns[name] = typed(np.asarray(values, dtype=dtype))
    return msgpack.packb(columns)


def _wal_state(db_path) -> tuple[int, int]:
    wal = db_path.with_name(db_path.name + "-wal")
    if not wal.exists():
        return (0, 0)
    stat = wal.stat()
    return (stat.st_size, stat.st_mtime_ns)


@pytest.mark.slow
def test_kill_9_during_a_large_batch_stores_it_whole_or_not_at_all(tmp_path):
    db_path = tmp_path / "crash.db"
    server = start_server(f"sqlite:///{db_path}", tmp_path, ["--max-body", str(256 * 2**20)])
    n = 120_000
    batch = make_batch(np.arange(n), np.random.default_rng(0))
    body = msgpack_body(batch)  # binary: a JSON body of this size is over the JSON limit
    outcomes = []
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            assert post(client, "warm", make_batch(np.arange(10), np.random.default_rng(1))).status_code == 200
        for attempt in range(2):
            run = f"crash-{attempt}"
            before = _wal_state(db_path)
            errors: list[BaseException] = []

            def send() -> None:
                try:
                    with httpx.Client(base_url=server.url, timeout=120) as client:
                        post(client, run, body, headers=MSGPACK)
                except httpx.HTTPError as error:
                    errors.append(error)

            sender = threading.Thread(target=send)
            sender.start()
            deadline = time.monotonic() + 60
            # The server is otherwise idle: the first write to the WAL is this transaction
            # spilling pages, long before its commit.
            while _wal_state(db_path) == before and time.monotonic() < deadline:
                time.sleep(0.001)
            server.kill()
            sender.join(60)
            with sqlite3.connect(db_path) as check:
                assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
                stored = check.execute("SELECT COALESCE(SUM(n), 0) FROM chunks JOIN runs ON runs.id = chunks.run_id "
                                       "WHERE runs.name = ?", (run,)).fetchone()[0]
                counted = check.execute("SELECT COALESCE(SUM(steps), 0) FROM runs WHERE name = ?",
                                        (run,)).fetchone()[0]
            assert stored in (0, n) and counted == stored
            outcomes.append(stored)
            server.start()
            with httpx.Client(base_url=server.url, timeout=120) as client:
                # The agent re-sends what was not acked: afterwards everything is stored exactly once.
                answer = post(client, run, body, headers=MSGPACK).json()
                assert answer["accepted"] + answer["duplicates"] == n and answer["conflicts"] == 0
                assert {r["name"]: r for r in client.get("/api/runs").json()}[run]["steps"] == n
    finally:
        server.stop()
    assert 0 in outcomes, f"no kill landed before the commit: {outcomes}"


def test_database_error_is_503_and_leaves_nothing_half_written(tmp_path):
    db_path = tmp_path / "broken.db"
    server = start_server(f"sqlite:///{db_path}", tmp_path)
    rng = np.random.default_rng(3)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert post(client, "fragile", make_batch(np.arange(100), rng)).status_code == 200
            with sqlite3.connect(db_path) as sabotage:
                sabotage.execute("DROP TABLE events")
            # Chunks are written first, then its spike event fails: the whole batch rolls back.
            broken = make_batch(np.arange(100, 200), rng, spike_steps=[150])
            answer = post(client, "fragile", broken)
            assert answer.status_code == 503 and "database" in answer.json()["detail"]
            assert client.get("/api/runs/fragile/series", params={"points": 10_000}).json()["step"] == \
                list(range(100))
            assert client.get("/api/runs/fragile/events").status_code == 503
            with sqlite3.connect(db_path) as sabotage:
                sabotage.execute("ALTER TABLE chunk_columns RENAME TO chunk_columns_gone")
            assert client.get("/api/runs/fragile/series").status_code in (200, 503)  # may be cached
            assert post(client, "fragile", make_batch(np.arange(300, 310), rng)).status_code == 503
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()
    with sqlite3.connect(db_path) as check:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert check.execute("SELECT SUM(n) FROM chunks").fetchone()[0] == 100
        assert check.execute("SELECT COUNT(DISTINCT chunk_id) FROM chunk_columns_gone").fetchone()[0] == 1
        assert check.execute("SELECT steps FROM runs WHERE name = 'fragile'").fetchone()[0] == 100
