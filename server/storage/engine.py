"""Engines and raw connections: one place that knows SQLite from PostgreSQL."""
from __future__ import annotations

from sqlalchemy import Engine, create_engine, event


SQLITE_PAGE_SIZE = 16384


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3, the driver gradwatch installs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, begin: str = "BEGIN", **pool) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout, foreign keys, and `begin` as the
    statement that opens a transaction (`BEGIN IMMEDIATE` for the schema upgrade).

    SQLite durability: WAL with `synchronous=NORMAL`. A commit appends its pages
    to the WAL without an fsync (the fsyncs happen at checkpoints), which is
    what lets an ingest batch commit in well under a millisecond. The answer to
    a batch is sent after its COMMIT returns, and a committed transaction
    survives the server process crashing or being killed (the WAL is in the
    OS's page cache; `tests/test_server_crash.py` kills -9 mid-batch). What
    NORMAL gives up is the last few transactions before a power loss or an OS
    crash: those may be rolled back on recovery, never half-applied, and the
    database is never corrupted.
    """
    url = normalize_url(url)
    pool = pool or {"pool_size": 8, "max_overflow": 16}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")  # a new file only; a no-op afterwards
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection) -> None:
            connection.exec_driver_sql(begin)

        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


def rollback_quietly(raw, is_sqlite: bool) -> None:
    """Roll back a raw DBAPI connection after a failure, never raising over the original error.

    SQLite transactions here are opened by hand (`BEGIN IMMEDIATE`), so they are ended by
    hand too; other drivers roll back through the DBAPI.
    """
    try:
        if is_sqlite:
            if raw.driver_connection.in_transaction:
                raw.cursor().execute("ROLLBACK")
        else:
            raw.rollback()
    except Exception:
        pass


class Database:
    """Raw DBAPI access for one engine: the dialect, `?` placeholders, short reads."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.dialect = engine.dialect.name
        self.is_sqlite = self.dialect == "sqlite"
        self.is_postgres = self.dialect == "postgresql"

    def sql(self, statement: str) -> str:
        """`statement` with `?` placeholders as this driver wants them."""
        return statement if self.is_sqlite else statement.replace("?", "%s")

    def begin(self, cursor, write: bool) -> None:
        if self.is_sqlite:
            cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    _sql = sql
    _begin = begin

    def read(self, statement: str, params: tuple = ()) -> list[tuple]:
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute(self.sql(statement), params)
            rows = cursor.fetchall()
            cursor.close()
            if not self.is_sqlite:
                raw.rollback()
            return rows
        finally:
            raw.close()
