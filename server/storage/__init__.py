"""Storage: the column registry and tables, migrations, ingest, reads, the run cache, the chunks.

- `registry`: step columns and event kinds, declared once (how to add one: its docstring)
- `tables`: the SQLAlchemy tables at Alembic head; `migrate`: upgrade before serving
  (`migrations/`: the Alembic revisions)
- `chunks/`: the chunk layout in pure NumPy (codec, merge, summaries, overview, tensor norms);
  `chunk_rows` moves its blobs in and out of the tables
- `engine`: engines and raw connections; `ingest`, `reads`, `cache`, `wal`, `serialise`
- `store.Store`: the facade routes use

Imports nothing of the app, analysis, alerts or commands rooms.
"""
from gradwatch.server.storage.cache import RunArrays, RunCache
from gradwatch.server.storage.engine import make_engine, normalize_url
from gradwatch.server.storage.ingest import MAX_RUN_META_BYTES, IngestResult, MetaTooLarge, StoredRows
from gradwatch.server.storage.migrate import SchemaError, create_schema, upgrade_database
from gradwatch.server.storage.reads import UnknownRun, iso
from gradwatch.server.storage.serialise import csv_lines, encode_series
from gradwatch.server.storage.store import Store
from gradwatch.server.storage.tables import SCHEMA_VERSION

__all__ = ["RunArrays", "RunCache", "make_engine", "normalize_url", "IngestResult", "MAX_RUN_META_BYTES",
           "MetaTooLarge", "StoredRows", "SchemaError", "create_schema", "upgrade_database", "UnknownRun", "iso",
           "csv_lines", "encode_series", "Store", "SCHEMA_VERSION"]
