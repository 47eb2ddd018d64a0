"""Baseline: schema version 1, as releases before Alembic created it.

Columns are spelled out here (not taken from the registry): a revision never
changes once released. A database made before Alembic with `schema_version`
1 is stamped with this revision, version 2 with `0002`.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("updated", sa.Double, nullable=False),
        sa.Column("meta", sa.Text, nullable=False),
        sa.Column("steps", sa.BigInteger, nullable=False),
        sa.Column("first_step", sa.BigInteger),
        sa.Column("last_step", sa.BigInteger),
        sa.Column("clips", sa.BigInteger, nullable=False),
        sa.Column("spikes", sa.BigInteger, nullable=False),
        sa.Column("nonfinite", sa.BigInteger, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "schema_version",
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    )
    op.create_table(
        "steps",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("step", sa.BigInteger, primary_key=True),
        *(sa.Column(name, sa.Boolean if name in ("clipped", "spike", "nonfinite") else sa.Double)
          for name in ("pre_norm", "post_norm", "scale", "threshold", "clipped", "loss", "lr", "z",
                       "ema", "spike", "nonfinite", "time")),
        sa.Column("nan_mask", sa.SmallInteger, nullable=False),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "tensor_layouts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("names", sa.Text, nullable=False),
        sa.UniqueConstraint("run_id", "digest"),
    )
    op.create_table(
        "tensor_norms",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("step", sa.BigInteger, primary_key=True),
        sa.Column("layout_id", sa.Integer, sa.ForeignKey("tensor_layouts.id"), nullable=False),
        sa.Column("norms", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("step", sa.BigInteger),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("value", sa.Double),
        sa.Column("threshold", sa.Double),
        sa.Column("nan_mask", sa.SmallInteger, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("time", sa.Double),
    )
    op.create_index("ix_events_run_kind_step", "events", ["run_id", "kind", "step"])
    op.create_index("ix_events_run_step", "events", ["run_id", "step"])
    op.execute("INSERT INTO schema_version (version) VALUES (1)")


def downgrade() -> None:
    for table in ("events", "tensor_norms", "tensor_layouts", "steps", "schema_version", "runs"):
        op.drop_table(table)
