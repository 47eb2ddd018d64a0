"""Schema 5 -> 6: `chunk_columns` keyed by (run, chunk, segment, column) instead of (run, column, chunk, segment).

A batch writes one row per column of one segment. Keyed by the column's name
first, those rows lay in as many places of the table's B-tree as there are
columns, and each wrote a page of its own (a 16 KiB leaf, for a ~3 KB share of it)
into the WAL: 827 KB of WAL appended per 2,000-step batch. Keyed by chunk and segment
first, the rows a batch writes are neighbours: 521 KB, and the ingesting thread's CPU
per batch 2.71 -> 2.31 ms (in process, checkpoints held off). With the shared checkpoints
of storage/wal.py, `benchmarks/ingest_profile.py --against-path` measured the store at
1,644 -> 793 KB written and 4.01 -> 2.45 ms of process CPU per batch. Reading one column
of a whole run now passes over the other columns' keys (a 1M-step run's `pre_norm`, cold:
23 -> 39 ms); the overview reads summaries and is unchanged.

SQLite cannot change a primary key in place: the rows are copied into a new table
(WITHOUT ROWID, as before), which then takes the old one's name. PostgreSQL swaps
the primary key constraint. One transaction with the rest of the upgrade.

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

OLD_KEY = ("run_id", "name", "chunk_id", "seg")
NEW_KEY = ("run_id", "chunk_id", "seg", "name")


def _rebuild(key: tuple[str, ...]) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        op.execute("ALTER TABLE chunk_columns DROP CONSTRAINT chunk_columns_pkey")
        op.execute(f"ALTER TABLE chunk_columns ADD PRIMARY KEY ({', '.join(key)})")
        return
    columns = {"run_id": sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
               "chunk_id": sa.Column("chunk_id", sa.BigInteger, primary_key=True),
               "seg": sa.Column("seg", sa.Integer, primary_key=True),
               "name": sa.Column("name", sa.String(40), primary_key=True)}
    op.create_table("chunk_columns_rekeyed", *(columns[name] for name in key),
                    sa.Column("data", sa.LargeBinary, nullable=False), sqlite_with_rowid=False)
    op.execute("INSERT INTO chunk_columns_rekeyed (run_id, chunk_id, seg, name, data) "
               "SELECT run_id, chunk_id, seg, name, data FROM chunk_columns ORDER BY " + ", ".join(key))
    op.drop_table("chunk_columns")
    op.rename_table("chunk_columns_rekeyed", "chunk_columns")


def upgrade() -> None:
    _rebuild(NEW_KEY)
    op.execute("UPDATE schema_version SET version = 6")


def downgrade() -> None:
    _rebuild(OLD_KEY)
    op.execute("UPDATE schema_version SET version = 5")
