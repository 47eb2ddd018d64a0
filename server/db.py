"""Tables, engine and schema creation.

Layout (see `storage.py` for how each table is written and read):

- `runs`: one row per run name, with counters kept up to date by ingest
  (steps, first/last step, clips, steps that carry a clipped flag, spikes,
  non-finite) so `GET /api/runs` never scans `steps`, and a `version` bumped
  by every batch that stores rows.
- `steps`: one row per (run, step), the primary key; a `WITHOUT ROWID` table in
  SQLite, so rows are stored clustered by (run_id, step) and range reads are
  sequential. A partial index on (run_id, step) of the clipped rows answers
  "the newest clip events" without scanning a run whose clips are sparse.
- `tensor_layouts` + `tensor_norms`: per-tensor norms as one packed float32
  blob per step, the tensor names stored once per run (per layout). Measured on
  this machine (SQLite, 10 batches of 2,000 steps x 100 tensors, 2 shared
  cores under load): a row per tensor per step (a WITHOUT ROWID table keyed by
  run, step, tensor) stored 0.19 M values/s at 21.7 bytes per value and read
  10,000 steps back into an array in 3.2 s; one blob per step stored 3.0 M
  values/s at 4.7 bytes per value and read the same range in 54 ms. The
  heatmap always reads whole steps, never one tensor alone, so the blob layout
  costs the queries nothing; float32 keeps NaN and Inf as they are.
- `events`: spike, nonfinite (derived from the columns on ingest), conflict
  (a re-sent step with different values) and agent reports (drop). Clip events
  are not stored: they are read from the clipped steps (`Store.events`), since
  early in training every step may clip and a row per clipped step halved
  ingest.
- `schema_version`: one row, the version of this layout. Version 1 (before
  `runs.clip_flags` and the clipped-steps index; clip events stored) is
  migrated in place on start (`create_schema`).

Non-finite floats: PostgreSQL's float8 stores NaN and +-Inf, SQLite stores
+-Inf but turns NaN into NULL. To store the same way everywhere, a NaN is
written as NULL and its bit is set in the row's `nan_mask` (bit i for the i-th
name in `FLOAT_FIELDS`); NULL without the bit is a missing value.
"""
from __future__ import annotations

from sqlalchemy import (BigInteger, Boolean, Double, Engine, ForeignKey, Index, Integer,
                        LargeBinary, SmallInteger, String, Text, UniqueConstraint, create_engine,
                        event, select, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 2
CLIPPED_INDEX = "ix_steps_clipped"
# How the partial index's predicate is spelled in each dialect; a query must use the same words.
CLIPPED_WHERE = {"sqlite": "clipped = 1", "postgresql": "clipped"}


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created: Mapped[float] = mapped_column(Double)
    updated: Mapped[float] = mapped_column(Double)
    meta: Mapped[str] = mapped_column(Text, default="{}")
    steps: Mapped[int] = mapped_column(BigInteger, default=0)
    first_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    clips: Mapped[int] = mapped_column(BigInteger, default=0)
    clip_flags: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # steps with a clipped flag
    spikes: Mapped[int] = mapped_column(BigInteger, default=0)
    nonfinite: Mapped[int] = mapped_column(BigInteger, default=0)
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class Step(Base):
    __tablename__ = "steps"
    __table_args__ = (Index(CLIPPED_INDEX, "run_id", "step", sqlite_where=text(CLIPPED_WHERE["sqlite"]),
                            postgresql_where=text(CLIPPED_WHERE["postgresql"])),
                      {"sqlite_with_rowid": False})

    run_id: Mapped[int] = mapped_column(Integer, ForeignKey("runs.id"), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    pre_norm: Mapped[float | None] = mapped_column(Double, nullable=True)
    post_norm: Mapped[float | None] = mapped_column(Double, nullable=True)
    scale: Mapped[float | None] = mapped_column(Double, nullable=True)
    threshold: Mapped[float | None] = mapped_column(Double, nullable=True)
    clipped: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    loss: Mapped[float | None] = mapped_column(Double, nullable=True)
    lr: Mapped[float | None] = mapped_column(Double, nullable=True)
    z: Mapped[float | None] = mapped_column(Double, nullable=True)
    ema: Mapped[float | None] = mapped_column(Double, nullable=True)
    spike: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    nonfinite: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    time: Mapped[float | None] = mapped_column(Double, nullable=True)
    nan_mask: Mapped[int] = mapped_column(SmallInteger, default=0)


class TensorLayout(Base):
    __tablename__ = "tensor_layouts"
    __table_args__ = (UniqueConstraint("run_id", "digest"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(Integer, ForeignKey("runs.id"))
    digest: Mapped[str] = mapped_column(String(64))
    names: Mapped[str] = mapped_column(Text)


class TensorNorms(Base):
    __tablename__ = "tensor_norms"

    run_id: Mapped[int] = mapped_column(Integer, ForeignKey("runs.id"), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    layout_id: Mapped[int] = mapped_column(Integer, ForeignKey("tensor_layouts.id"))
    norms: Mapped[bytes] = mapped_column(LargeBinary)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_run_kind_step", "run_id", "kind", "step"),
                      Index("ix_events_run_step", "run_id", "step"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(Integer, ForeignKey("runs.id"))
    step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    kind: Mapped[str] = mapped_column(String(32))
    value: Mapped[float | None] = mapped_column(Double, nullable=True)
    threshold: Mapped[float | None] = mapped_column(Double, nullable=True)
    nan_mask: Mapped[int] = mapped_column(SmallInteger, default=0)
    message: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    time: Mapped[float | None] = mapped_column(Double, nullable=True)


class SchemaVersion(Base):
    __tablename__ = "schema_version"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)


class SchemaError(RuntimeError):
    pass


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3, the driver gradwatch installs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout, foreign keys, explicit BEGIN.

    SQLite durability: WAL with `synchronous=NORMAL`. A commit appends its pages
    to the WAL without an fsync (the fsyncs happen at checkpoints), which is
    what lets an ingest batch commit in well under a millisecond. The answer to
    a batch is sent after its COMMIT returns, and a committed transaction
    survives the server process crashing or being killed (the WAL is in the
    OS's page cache; `tests/test_server_crash.py` kills -9 mid-batch). What
    NORMAL gives up is the last few transactions before a power loss or an OS
    crash: those may be rolled back on recovery, never half-applied, and the
    database is never corrupted. `synchronous=FULL` would fsync every commit
    (about 0.4 ms more per batch on this machine's disk).
    """
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=8, max_overflow=16)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection) -> None:
            connection.exec_driver_sql("BEGIN")

        return engine
    return create_engine(url, pool_size=8, max_overflow=16, pool_pre_ping=True)


def create_schema(engine: Engine) -> None:
    """Create missing tables and check (or record) the schema version; migrate version 1."""
    Base.metadata.create_all(engine, checkfirst=True)
    with engine.begin() as connection:
        found = connection.execute(select(SchemaVersion.version)).scalars().all()
        if not found:
            connection.execute(SchemaVersion.__table__.insert().values(version=SCHEMA_VERSION))
            return
        version = max(found)
    if version == 1:
        _migrate_from_1(engine)
    elif version != SCHEMA_VERSION:
        raise SchemaError(f"database schema version {version} is not the supported "
                          f"version {SCHEMA_VERSION}")


def _migrate_from_1(engine: Engine) -> None:
    """Version 1 to 2, in one transaction that holds the write lock (several server
    processes may start at once): add `runs.clip_flags` (counted from the stored
    steps), add the clipped-steps index, and delete the clip events that version 1
    derived on ingest (clip events are now read from the steps; kept, they would
    show twice). Clip events an agent sent itself (any other message, or a detail)
    are kept."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        sqlite = engine.dialect.name == "sqlite"
        if sqlite:
            cursor.execute("BEGIN IMMEDIATE")
        else:
            cursor.execute("LOCK TABLE schema_version IN ACCESS EXCLUSIVE MODE")
        cursor.execute("SELECT MAX(version) FROM schema_version")
        if cursor.fetchone()[0] == 1:  # not migrated by another process meanwhile
            cursor.execute("ALTER TABLE runs ADD COLUMN clip_flags BIGINT NOT NULL DEFAULT 0")
            cursor.execute("UPDATE runs SET clip_flags = (SELECT COUNT(*) FROM steps "
                           "WHERE steps.run_id = runs.id AND steps.clipped IS NOT NULL)")
            where = CLIPPED_WHERE[engine.dialect.name]
            cursor.execute(f"CREATE INDEX IF NOT EXISTS {CLIPPED_INDEX} ON steps (run_id, step) WHERE {where}")
            cursor.execute("DELETE FROM events WHERE kind = 'clip' AND detail IS NULL "
                           "AND message LIKE 'pre-clip norm % clipped'")
            cursor.execute("UPDATE schema_version SET version = 2")
        if sqlite:
            cursor.execute("COMMIT")
        else:
            raw.commit()
        cursor.close()
    except BaseException:
        rollback_quietly(raw, engine.dialect.name == "sqlite")
        raise
    finally:
        raw.close()


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
