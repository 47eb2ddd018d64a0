"""Schema 3 -> 4: `alert_claims`, the alert rate limit shared by every worker and server.

One row per (run, kind): when the last alert of that kind about that run was
sent. A dispatcher claims an alert with a conditional UPDATE (or an INSERT
that does nothing on conflict) in one transaction, so of several workers or
servers on one database exactly one sends it.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("alert_claims",
                    sa.Column("run", sa.String(200), primary_key=True),
                    sa.Column("kind", sa.String(40), primary_key=True),
                    sa.Column("last_sent", sa.Double, nullable=False))
    op.execute("UPDATE schema_version SET version = 4")


def downgrade() -> None:
    op.drop_table("alert_claims")
    op.execute("UPDATE schema_version SET version = 3")
