"""Schema 2 -> 3: step columns `skipped`, `robust_z`, `level_shift` (the robust detector).

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = (("skipped", sa.Boolean), ("robust_z", sa.Double), ("level_shift", sa.Boolean))


def upgrade() -> None:
    for name, type_ in COLUMNS:
        op.add_column("steps", sa.Column(name, type_, nullable=True))
    op.execute("UPDATE schema_version SET version = 3")


def downgrade() -> None:
    for name, _ in reversed(COLUMNS):
        op.drop_column("steps", name)
    op.execute("UPDATE schema_version SET version = 2")
