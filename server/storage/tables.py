"""Table definitions (SQLAlchemy Core), the `steps` columns taken from the registry.

This is the schema at Alembic head; `server/storage/migrations/versions/` holds how each
older layout becomes this one (the revisions spell their own columns out: a
migration must not change when the registry grows). `test_server_migrations`
checks that a fresh database upgraded to head matches these tables.

Layout:

- `runs`: one row per run name, with counters kept up to date by ingest
  (steps, first/last step, clips, steps that carry a clipped flag, spikes,
  non-finite) so `GET /api/runs` never scans `steps`, and a `version` bumped
  by every batch that stores rows.
- `chunks`, `chunk_columns`, `chunk_summaries`: a run's steps in chunks of
  4,096 consecutive step numbers, each column one packed blob per chunk, with
  a summary entry per 64 steps written at ingest (server/storage/chunks/ for
  the codec, storage/chunk_rows.py for the rows). Measured against the row per
  step it replaced (schema 4): `benchmarks/scale_bench.py`. A batch that only
  appends to a chunk adds a segment (`seg`) holding just its rows, with their
  own summary entries, instead of rewriting the chunk and its summary (joined
  into one once the run has moved past the chunk: storage/compact.py); a chunk
  is rewritten whole (one segment) when a step lands inside it or it has
  `MAX_SEGMENTS` segments.
- `tensor_chunks` + `tensor_summaries`: per-tensor norms in the same chunks,
  a steps x tensors float32 matrix with the chunk's tensor names, and the
  per-64-step maxima the heatmap of a long run reads; each batch adds its rows
  as a segment (a step's tensor row is stored with the step, so never twice),
  and a chunk of MAX_SEGMENTS segments is rewritten as one.
- `events`: spike, nonfinite (derived from the columns on ingest), conflict,
  and what agents send (registry.EVENT_KINDS). Clip events are not stored:
  they are read from the clipped steps.
- `schema_version`: one row, the layout's version number (kept beside Alembic's
  `alembic_version` so releases from before Alembic refuse a newer database).
"""
from __future__ import annotations

from sqlalchemy import (BigInteger, Column, Double, ForeignKey, Index, Integer, LargeBinary, MetaData,
                        SmallInteger, String, Table, Text)

SCHEMA_VERSION = 7

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

chunks = Table(
    "chunks", metadata,
    Column("run_id", Integer, ForeignKey("runs.id"), primary_key=True),
    Column("chunk_id", BigInteger, primary_key=True),
    Column("n", Integer, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("segments", Integer, nullable=False),
    sqlite_with_rowid=False,
)

chunk_columns = Table(
    "chunk_columns", metadata,
    Column("run_id", Integer, ForeignKey("runs.id"), primary_key=True),
    Column("chunk_id", BigInteger, primary_key=True),
    Column("seg", Integer, primary_key=True),
    Column("name", String(40), primary_key=True),
    Column("data", LargeBinary, nullable=False),
    sqlite_with_rowid=False,
)

chunk_summaries = Table(
    "chunk_summaries", metadata,
    Column("run_id", Integer, ForeignKey("runs.id"), primary_key=True),
    Column("width", Integer, primary_key=True),
    Column("chunk_id", BigInteger, primary_key=True),
    Column("seg", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
    sqlite_with_rowid=False,
)

tensor_chunks = Table(
    "tensor_chunks", metadata,
    Column("run_id", Integer, ForeignKey("runs.id"), primary_key=True),
    Column("chunk_id", BigInteger, primary_key=True),
    Column("seg", Integer, primary_key=True),
    Column("n", Integer, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),
)

tensor_summaries = Table(
    "tensor_summaries", metadata,
    Column("run_id", Integer, ForeignKey("runs.id"), primary_key=True),
    Column("chunk_id", BigInteger, primary_key=True),
    Column("seg", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
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

# The alert rate limit shared by workers and servers (server/alerts/dispatch.py `DatabaseClaims`).
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
