"""Schema 1 -> 2: `runs.clip_flags`, the clipped-steps index, clip events read from steps.

Adds `runs.clip_flags` (counted from the stored steps) and the partial index of
clipped steps, and deletes the clip events version 1 derived on ingest (clip
events are now read from the steps; kept, they would show twice). Clip events
an agent sent itself (any other message, or a detail) are kept.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

CLIPPED_WHERE = {"sqlite": "clipped = 1", "postgresql": "clipped"}


def upgrade() -> None:
    op.execute("ALTER TABLE runs ADD COLUMN clip_flags BIGINT NOT NULL DEFAULT 0")
    op.execute("UPDATE runs SET clip_flags = (SELECT COUNT(*) FROM steps "
               "WHERE steps.run_id = runs.id AND steps.clipped IS NOT NULL)")
    op.create_index("ix_steps_clipped", "steps", ["run_id", "step"],
                    sqlite_where=sa.text(CLIPPED_WHERE["sqlite"]),
                    postgresql_where=sa.text(CLIPPED_WHERE["postgresql"]))
    op.execute("DELETE FROM events WHERE kind = 'clip' AND detail IS NULL "
               "AND message LIKE 'pre-clip norm % clipped'")
    op.execute("UPDATE schema_version SET version = 2")


def downgrade() -> None:
    raise NotImplementedError("schema 2 -> 1 is not supported (derived clip events are gone)")
