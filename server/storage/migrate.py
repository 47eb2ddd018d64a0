"""Bring a database to the schema this server knows (Alembic head), before serving.

`upgrade_database(url)` runs in `gradwatch serve` (and `create_app`) before
anything else touches the tables. It is safe when several workers or servers
start at once: the whole check-and-upgrade is one transaction that first takes
a lock every starter waits on: `BEGIN IMMEDIATE` (SQLite's write lock) or a
transaction-scoped advisory lock on PostgreSQL, whose DDL is transactional.
The second starter then finds the schema at head and does nothing.

Databases from before Alembic have no `alembic_version` table: their
`schema_version` (1 or 2) says which revision they are at, and they are
stamped with it first. A database newer than this server (a revision it does
not know, or a `schema_version` above `SCHEMA_VERSION`) is refused with a
`SchemaError` naming both versions; nothing is changed.
"""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import Connection, inspect, text
from sqlalchemy.pool import NullPool

from gradwatch.server.storage.engine import make_engine
from gradwatch.server.storage.tables import SCHEMA_VERSION

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
LEGACY_REVISIONS = {1: "0001", 2: "0002"}   # schema_version before Alembic -> its revision
ADVISORY_LOCK_KEY = 0x67726477              # "grdw": pg_advisory_xact_lock key of the upgrade


class SchemaError(RuntimeError):
    """The database's schema cannot be used by this server."""


def alembic_config(connection: Connection | None = None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def _state(connection: Connection) -> tuple[str | None, int | None, set[str]]:
    """(Alembic revision, schema_version, table names) as the database has them now."""
    tables = set(inspect(connection).get_table_names())
    revision = version = None
    if "alembic_version" in tables:
        revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    if "schema_version" in tables:
        version = connection.execute(text("SELECT MAX(version) FROM schema_version")).scalar()
    return revision, version, tables


def upgrade_database(url: str) -> tuple[str | None, str]:
    """Upgrade the database at `url` to head under the migration lock; (revision before, after)."""
    from alembic import command

    engine = make_engine(url, begin="BEGIN IMMEDIATE", poolclass=NullPool)
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
            revision, version, tables = _state(connection)
            head = head_revision()
            if version is not None and version > SCHEMA_VERSION or \
                    revision is not None and revision not in _known_revisions():
                raise SchemaError(
                    f"database schema version {version} (revision {revision}) is newer than this "
                    f"server's schema version {SCHEMA_VERSION} (revision {head}): upgrade gradwatch "
                    f"to serve it")
            config = alembic_config(connection)
            if revision is None and "runs" in tables:  # made before Alembic
                legacy = LEGACY_REVISIONS.get(version if version is not None else 2)
                if legacy is None:
                    raise SchemaError(f"database schema version {version} is not one this server "
                                      f"(schema version {SCHEMA_VERSION}) can upgrade")
                command.stamp(config, legacy)
                revision = legacy
            if revision != head:
                command.upgrade(config, "head")
            return revision, head
    finally:
        engine.dispose()


def create_schema(engine) -> None:
    """`upgrade_database` for an engine's URL (kept for callers that hold an engine)."""
    upgrade_database(engine.url.render_as_string(hide_password=False))
