"""Table definitions (SQLAlchemy Core), the `steps` columns taken from the registry.

This is the schema at Alembic head; `server/migrations/versions/` holds how each
older layout becomes this one (the revisions spell their own columns out: a
migration must not change when the registry grows). `test_server_migrations`
checks that a fresh database upgraded to head matches these tables.

Layout:

- `runs`: one row per run name, with counters kept up to date by ingest
  (steps, first/last step, clips, steps that carry a clipped flag, spikes,
  non-finite) so `GET /api/runs` never scans `steps`, and a `version` bumped
  by every batch that stores rows.
- `steps`: one row per (run, step), the primary key; a `WITHOUT ROWID` table in
  SQLite, so rows are stored clustered by (run_id, step) and range reads are
  sequential. A partial index on (run_id, step) of the clipped rows answers
  "the newest clip events" without scanning a run whose clips are sparse.
  NaN floats are NULL with the column's bit set in `nan_mask` (registry.NAN_BITS).
- `tensor_layouts` + `tensor_norms`: per-tensor norms as one packed float32
  blob per step, the tensor names stored once per run (per layout). Measured
  (SQLite, 2 shared cores): a row per tensor per step stored 0.19 M values/s at
  21.7 bytes per value; one blob per step 3.0 M values/s at 4.7 bytes per
  value, and the heatmap always reads whole steps. float32 keeps NaN and Inf.
- `events`: spike, nonfinite (derived from the columns on ingest), conflict,
  and what agents send (registry.EVENT_KINDS). Clip events are not stored:
  they are read from the clipped steps.
- `schema_version`: one row, the layout's version number (kept beside Alembic's
  `alembic_version` so releases from before Alembic refuse a newer database).
"""
from __future__ import annotations

from sqlalchemy import (BigInteger, Boolean, Column, Double, ForeignKey, Index, Integer, LargeBinary,
                        MetaData, SmallInteger, String, Table, Text, UniqueConstraint, text)

from gradwatch.server.storage.registry import STEP_COLUMNS

SCHEMA_VERSION = 4
CLIPPED_INDEX = "ix_steps_clipped"
# How the partial index's predicate is spelled in each dialect; a query must use the same words.
CLIPPED_WHERE = {"sqlite": "clipped = 1", "postgresql": "clipped"}
SQL_TYPES = {"int": BigInteger, "float": Double, "bool": Boolean}

metadata = MetaData()

runs = Table(
    "runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("created", Double, nullable=False),
    Column("updated", Double, nullable=False),
    Column("meta", Text, nullable=False),
    Column("steps", BigInteger, nullable=False),
    Column("first_step", BigInteger),
    Column("last_step", BigInteger),
    Column("clips", BigInteger, nullable=False),
    Column("clip_flags", BigInteger, nullable=False, server_default="0"),
    Column("spikes", BigInteger, nullable=False),
    Column("nonfinite", BigInteger, nullable=False),
    Column("version", BigInteger, nullable=False),
)

steps = Table(
    "steps", metadata,
    Column("run_id", Integer, ForeignKey("runs.id"), primary_key=True),
    Column("step", BigInteger, primary_key=True),
    *(Column(c.name, SQL_TYPES[c.type], nullable=True) for c in STEP_COLUMNS if c.name != "step"),
    Column("nan_mask", SmallInteger, nullable=False),
    Index(CLIPPED_INDEX, "run_id", "step", sqlite_where=text(CLIPPED_WHERE["sqlite"]),
          postgresql_where=text(CLIPPED_WHERE["postgresql"])),
    sqlite_with_rowid=False,
)

tensor_layouts = Table(
    "tensor_layouts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False),
    Column("digest", String(64), nullable=False),
    Column("names", Text, nullable=False),
    UniqueConstraint("run_id", "digest"),
)

tensor_norms = Table(
    "tensor_norms", metadata,
    Column("run_id", Integer, ForeignKey("runs.id"), primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("layout_id", Integer, ForeignKey("tensor_layouts.id"), nullable=False),
    Column("norms", LargeBinary, nullable=False),
)

events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False),
    Column("step", BigInteger),
    Column("kind", String(32), nullable=False),
    Column("value", Double),
    Column("threshold", Double),
    Column("nan_mask", SmallInteger, nullable=False),
    Column("message", Text, nullable=False),
    Column("detail", Text),
    Column("time", Double),
    Index("ix_events_run_kind_step", "run_id", "kind", "step"),
    Index("ix_events_run_step", "run_id", "step"),
)

# The alert rate limit shared by workers and servers (server/alerts.py `DatabaseClaims`).
alert_claims = Table(
    "alert_claims", metadata,
    Column("run", String(200), primary_key=True),
    Column("kind", String(40), primary_key=True),
    Column("last_sent", Double, nullable=False),
)

schema_version = Table(
    "schema_version", metadata,
    Column("version", Integer, primary_key=True),
)
