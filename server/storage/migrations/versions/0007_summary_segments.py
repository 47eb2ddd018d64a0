"""Schema 6 -> 7: `chunk_summaries` gets a segment number (`seg`), keyed (run, width, chunk, segment).

An append to a chunk writes its rows as the chunk's next segment (schema 5), but
it rewrote the chunk's whole 64-step summary and kept rows: at 500-step batches
a 48 KB summary eight times per chunk. Now each segment has its own summary
entries (and kept rows, where it has any) and reads merge them
(`server/storage/chunk_rows.py`). The rows already stored become segment 0,
which is what they are: one summary of the whole chunk.

SQLite cannot change a primary key in place: the rows are copied into a new table
(WITHOUT ROWID, as before), which then takes the old one's name. PostgreSQL adds
the column and swaps the primary key constraint. The downgrade first merges each
chunk's segments into one row per chunk and width, as schema 6 reads them.
One transaction with the rest of the upgrade.

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

KEY_6 = ("run_id", "width", "chunk_id")
KEY_7 = ("run_id", "width", "chunk_id", "seg")


def _rebuild(key: tuple[str, ...]) -> None:
    bind = op.get_bind()
    segmented = "seg" in key
    if bind.dialect.name != "sqlite":
        if segmented:
            op.execute("ALTER TABLE chunk_summaries ADD COLUMN seg INTEGER NOT NULL DEFAULT 0")
        op.execute("ALTER TABLE chunk_summaries DROP CONSTRAINT chunk_summaries_pkey")
        if not segmented:
            op.execute("ALTER TABLE chunk_summaries DROP COLUMN seg")
        op.execute(f"ALTER TABLE chunk_summaries ADD PRIMARY KEY ({', '.join(key)})")
        return
    columns = [sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
               sa.Column("width", sa.Integer, primary_key=True),
               sa.Column("chunk_id", sa.BigInteger, primary_key=True)]
    if segmented:
        columns.append(sa.Column("seg", sa.Integer, primary_key=True))
    op.create_table("chunk_summaries_rekeyed", *columns,
                    sa.Column("data", sa.LargeBinary, nullable=False), sqlite_with_rowid=False)
    names = ", ".join(KEY_6)
    op.execute(f"INSERT INTO chunk_summaries_rekeyed ({', '.join(key)}, data) "
               f"SELECT {names}{', 0' if segmented else ''}, data FROM chunk_summaries ORDER BY {names}")
    op.drop_table("chunk_summaries")
    op.rename_table("chunk_summaries_rekeyed", "chunk_summaries")


def upgrade() -> None:
    _rebuild(KEY_7)
    op.execute("UPDATE schema_version SET version = 7")


def _merge_segments() -> None:
    """Each chunk's summary segments as one segment 0 (what schema 6 reads): the 64-step
    entries joined (a block two segments share merged), the kept rows concatenated."""
    from gradwatch.server.storage.chunk_rows import KEPT_WIDTH, SPEC, ChunkRows, pack_rows
    from gradwatch.server.storage.chunks import BLOCK, encode_summary

    bind = op.get_bind()
    sqlite = bind.dialect.name == "sqlite"

    def sql(statement: str) -> str:
        return statement if sqlite else statement.replace("?", "%s")

    rows = ChunkRows(sql)
    cursor = bind.connection.cursor()
    cursor.execute("SELECT DISTINCT run_id, chunk_id FROM chunk_summaries WHERE seg > 0 ORDER BY run_id, chunk_id")
    for run_id, chunk_id in cursor.fetchall():
        summary = encode_summary(rows.summaries_of(cursor, run_id, [chunk_id]))
        kept = rows.kept_rows(cursor, run_id, [chunk_id], tuple(SPEC)).get(chunk_id)
        cursor.execute(sql("DELETE FROM chunk_summaries WHERE run_id = ? AND chunk_id = ?"), (run_id, chunk_id))
        cursor.execute(sql("INSERT INTO chunk_summaries (run_id, width, chunk_id, seg, data) VALUES (?, ?, ?, 0, ?)"),
                       (run_id, BLOCK, chunk_id, summary))
        if kept is not None:   # unreadable: schema 6 decodes the chunk instead, as it did
            cursor.execute(sql("INSERT INTO chunk_summaries (run_id, width, chunk_id, seg, data) "
                               "VALUES (?, ?, ?, 0, ?)"), (run_id, KEPT_WIDTH, chunk_id, pack_rows(kept)))
    cursor.close()


def downgrade() -> None:
    _merge_segments()
    _rebuild(KEY_6)
    op.execute("UPDATE schema_version SET version = 6")
